"""Training: the loop of :func:`~pyro_esc.fit` (:mod:`.loop`) and what it is made of: its options,
validated once (:mod:`.options`), Adam recipes for the SVI route (:mod:`.recipes`), steppers behind
one protocol (:mod:`.steppers`; the row-wise route :mod:`.rowwise`, the EM route :mod:`.em`),
convergence tests (:mod:`.convergence`), the history (:mod:`.history`), checkpoints
(:mod:`.checkpoint`), restarts (:mod:`.restarts`), standard units (:mod:`.standard_units`) and
param-store isolation (``_isolation``). Imports inference and everything below it.
"""
