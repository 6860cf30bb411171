"""Pure evaluation metrics: arrays in, arrays or dicts out, no file I/O.

``roc`` (TAR@FAR, EER variants, minDCF), ``verification`` (10-fold pair accuracy), ``retrieval``
(recall@k, mAP, MAP@R over FAISS ``search``), ``ijb`` (template pooling, pair scores, open-set 1:N),
``trials`` (cosine trial scores, cohort score normalisation).
"""
