#include <gnutls/gnutls.h>
#include <gnutls/x509.h>

/* gnutls_malloc and gnutls_free are mutable global function pointers, which Swift 6 will not
 * touch from concurrent code; these call them. */
static inline void *cgnutls_malloc(size_t size) { return gnutls_malloc(size); }
static inline void cgnutls_free(void *p) { gnutls_free(p); }
