"""fastseed: fast, faithful self-supervised distillation of small vision encoders.

Two of its packages live in top-level folders of the repository, as the project's layout
keeps them: ``kernels/`` is ``fastseed.kernels`` and ``data_prep/`` is ``fastseed.data_prep``.
``fastseed/kernels`` and ``fastseed/data_prep`` are symbolic links to those folders, so a plain
checkout imports them (``PYTHONPATH=. python -c 'import fastseed.kernels'``) and editors follow
them without an install; setup.py's ``package_dir`` maps the same folders into wheels.
The layers and the way data flows through them: docs/ARCHITECTURE.md.
"""


def __getattr__(name: str):
    # `fastseed.load_encoder` without importing torch and timm at `import fastseed`
    if name == "load_encoder":
        from fastseed.export import load_encoder
        return load_encoder
    raise AttributeError(f"module 'fastseed' has no attribute {name!r}")
