"""Model builders behind registries (LMM families, SAM); heavy imports happen lazily inside them.

The toy LLaVA of the default run is not here: it lives in :mod:`stages.toy.model`."""
