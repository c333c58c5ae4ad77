"""The contract's rules for input, shared by the server (request bodies, query parameters) and the storage
layer (catalog files): ``fields`` (patterns, lengths, formats, the problem details), ``images`` (an
``ImageCreateReq`` read field by field), ``catalog_entries`` (entries of catalog files). They report
problems as ``ValidationDetail``s and raise ``Invalid`` (cluster_engine/invalid.py), never HTTP types.
"""
