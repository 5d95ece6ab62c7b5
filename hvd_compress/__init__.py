"""hvd_compress: gradient compression for Horovod."""
