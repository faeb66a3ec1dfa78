"""Internal modules of keras-rdrop: import the public API from `keras_rdrop`."""
