"""Face (identity-labelled image) data: datasets, RecordIO, transforms, batches, .bin pairs, alignment.

Import names from the modules (or from :mod:`mlearn.data`); this package imports nothing itself.
"""
