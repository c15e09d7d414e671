"""Data, losses, optimiser, metrics and training helpers for FSANet."""
