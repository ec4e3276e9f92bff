"""Analysis defaults and clip-norm presets, shipped as YAML package data (gradscope.configs)."""
