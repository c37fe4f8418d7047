"""Models used by the reproductions."""
