"""Data: label tables, file readers, dataset layouts, the training pipeline, RCS, the paired
loader and the embedded demo domain pair."""
