"""Cache sizing from access traces: hit rate against cache size, by pure computation.

Nothing here talks to Redis or SQL. ``sampling`` (the spatial sampling rule) imports only the
standard library, so the serving path can use it; the other modules load numpy, pyarrow or
matplotlib and are imported by ``featcache analyze`` and the benchmarks alone:

    sampling    which (view, entity id) pairs a sampled trace keeps: a stable hash
    trace       ``Trace`` (a view's entity ids in access order) and ``sample``
    readers     a trace from a CSV or Parquet file
    mattson     stack distances; LRU hit rate at every size, exact or by SHARDS
    policies    simulated hit rates of the L1 policies, through ``featcache.l1.L1Cache``
    ceiling     the freshness ceiling: an infinite cache's hit rate under ``max_age``
    report      an analysis of one trace: curves at chosen sizes, sizes for targets, JSON
    plot        the PNG of an analysis
    redis_trace the sampled trace kept in Redis (the seam ``featcache analyze --config`` reads)
"""
