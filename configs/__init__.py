"""Run configs, shipped in the wheel as ``sora_jax.configs`` (this folder is mapped there by
``pyproject.toml``): ``--config NAME[:arg]`` names one from anywhere, ``--config path.py`` a file."""
