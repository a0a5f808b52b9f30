"""Applications of trained models and training beyond fit: encoding new data (:mod:`.encoding`),
denoising images (:mod:`.denoising`), the scikit-learn estimator (:mod:`.sklearn`), Lightning and DDP
(:mod:`.lightning`) and warm-started amortised inference (:mod:`.warm_start`).
"""
