"""Evaluation protocols: file readers, typed suite options (``options``) and suite adapters, one
module per suite ``type``: ``bins`` (bin), ``ijb`` (+ ``ijb_meta``), ``trials``, ``retrieval``,
``own_data`` (+ ``own_data_pairs``: the user's folder, pair list or trial list, with thresholds).

Each adapter module has ``run(model, options, root, batch_size, cache) -> List[ResultRow]`` and
``run_protocol(model, entry_dict, root, batch_size)`` for a plain dict.
"""
