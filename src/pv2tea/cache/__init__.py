"""The on-disk feature cache of the frozen backbones: their outputs encoded once, read by later runs.

``identity`` says which backbone (weights, image size, the config fields that change the features) a cache holds
the outputs of, and how rows are keyed (image file contents, cropped texts); ``store`` is the format on disk
(shards, manifest, partial and stale detection) and its lazy reader; ``build`` is the encoding pass.
"""
