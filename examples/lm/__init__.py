"""A Qwen2-style language model trained with bcopt optimizers: model.py, data.py, train.py."""
