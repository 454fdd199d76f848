"""The science: influence estimates and leave-one-out ground truth for small networks. Pure PyTorch.

Modules: ``data`` (datasets as tensors), ``models`` (functional MLPs over a flat θ), ``objective`` (R(θ; w)),
``train`` (θ̂), ``retrain`` (leave-one-out retraining, batched or one model at a time, and the minibatch
order and schedules training shares), ``stacked`` (the hand-derived gradient that batched retraining runs on), ``curvature`` (Hessian and Gauss-Newton products), ``ihvp`` ((H + δI)^{-1} v: the
interface, ``exact``, ``make_solver``) with one module per family of methods (``ihvp_krylov``: cg, arnoldi;
``ihvp_lissa``; ``ihvp_ekfac``), ``registry`` (the vocabularies and each method's settings, declared once;
no torch, so the spec layer reads it cheaply), ``scores`` (estimates, choice of test points and removals),
``metrics`` (correlations, streaming accumulator). Nothing is re-exported here.
Sign convention everywhere: positive = the test loss goes up when the training point is removed.
This package never imports ``storage``, ``jobs``, ``cluster`` or ``ray``.
"""
