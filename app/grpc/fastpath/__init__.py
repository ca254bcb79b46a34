"""A leaner server path for unary calls and a faster codec, on grpclib's and h2's internals."""
