"""Backbone weights: conversion between layouts (pure functions), safe file loading with manifests,
and resolving ``--weights`` into a :class:`~transfer.weights.resolve.BackboneWeights`."""
