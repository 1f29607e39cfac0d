"""Examples of bcopt."""
