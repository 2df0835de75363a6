"""Transport: PKI for mTLS (``pki``), TLS contexts (``tls``), signed requests (``signing``), client (``http``)."""
