# The baseline for the demo: the same model, data and budget as `demo`, source cross-entropy only.
{
    "_base_": "demo",
    "name": "source_only",
    "method": "source_only",
}
