"""Backend implementations of the ops; cdam_fast.dispatch chooses among them."""
