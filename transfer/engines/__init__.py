"""Transfer engines: one package each (``torchvision``: built in, always there; ``detectron2``: the reference
implementation, when ``import detectron2`` works). A package's ``__init__`` registers its
:class:`transfer.registry.Engine` (what it implements, whether it can run here, what it refuses);
:mod:`transfer.plugins` imports every package here. Task specs (``transfer/tasks/``) say what is measured;
engines say how.
"""
