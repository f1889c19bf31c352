"""Sparse autoencoders in SAELens' on-disk format: the module (:mod:`.model`), its config
and ``cfg.json`` layout (:mod:`.config`), SAE features as directions and as the input basis
of interaction matrices (:mod:`.features`), and a top-k trainer (:mod:`.train`)."""
