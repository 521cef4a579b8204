"""silotune."""
