"""The runtime layer, the paged runtime on the device: the KV cache and its allocator (``cache``), sampling under
token masks (``sampling``), placement over a device mesh (``sharding``) and the jitted steps over them
(``steps``)."""
