"""The kernels' libraries built at install time (``LOMT_BUILD_EXT=1``, see ``setup.py``), named
``<extension>_<key>`` as :mod:`lomt_kernels.kernels._extension` looks them up; empty otherwise."""
