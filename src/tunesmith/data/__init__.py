"""Data path: records on disk -> normalized examples -> rendered template -> masked token ids -> batches."""
