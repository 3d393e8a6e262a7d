"""Config presets, shipped in the package as `confeti_fast.configs`; each file is one dict literal."""
