"""The built-in task specs: every module here registers its tasks when imported (:mod:`transfer.plugins`
imports them all; see ``transfer.registry``)."""
