"""Speaker (labelled audio) data: reading, lists, the dataset, augmentation, fbank, the data module.

Import names from the modules (or from :mod:`mlearn.data`); this package imports nothing itself, so
that ``mlearn.data.audio.fbank`` stays light for the models that use it.
"""
