"""The embed chain's stages, in data-flow order. Each is one ``map_batches`` body (or class)
that takes one picklable spec; none imports anything from ``driver``, ``ops`` or ``table``.

    dedupe    the duplicate-id pre-pass: every unit's ids -> IdShard actors -> losers per source
    read      units (files, row groups, byte ranges, Lance fragments) -> rows with lineage
    check     row checks (duplicate id as dedupe decided, null id, invisible text) -> a status
              and a reason
    tokens    texts -> int32 token ids (CPU), task prefix applied
    bucket    a window of rows sorted by length, cut into token-budget batches (batching)
    encode    actors holding the model: batches -> pooled, normalized Matryoshka vectors
    write     uncommitted Lance fragments of the output and of the rejected rows
"""
