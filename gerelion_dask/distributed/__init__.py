"""Dask execution of the iteration: particle pools as tasks on (GPU) workers, images in Zarr, tree reductions.

* :mod:`.cluster`: :func:`~.cluster.make_client` (an existing scheduler, a LocalCUDACluster, or a LocalCluster of
  NumPy workers) and ``gerelion cluster start|stop|status``;
* :mod:`.runner`: :class:`~.runner.DaskRunner`, the driver's runner that submits one E-step task per pool;
* :mod:`.tasks`: what runs on the workers; :mod:`.reduce`: the fixed pairwise summation order (both runners);
* :mod:`.store`: the job's ``particles.zarr`` in half-set order.

Nothing is imported here (``import gerelion_dask.distributed`` starts no Dask machinery); import the modules.
"""
