"""The self-contained Hugging Face code that `andromeda.interop.hf.export_hf` copies into every
exported folder (configuration_andromeda.py, modeling_andromeda.py). They import only torch and
transformers, never andromeda; this package file exists only so the two ship as package data."""
