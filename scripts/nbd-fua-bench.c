// nbd-fua-bench: writes with NBD_CMD_FLAG_FUA at a fixed queue depth through libnbd, for the
// FUA rows of scripts/bench (fio's nbd engine has no FUA option). One connection; random or
// sequential offsets; prints one line: IOPS MB/s p50_us p99_us.
//
//   nbd-fua-bench URI rw(randwrite|write) bs qd seconds size_bytes
//
// Built by scripts/bench (cc -O2 ... -lnbd).
#include <libnbd.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

static int cmp(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return x < y ? -1 : x > y;
}

static uint64_t rng = 88172645463325252ull;
static uint64_t next(void) {
  rng ^= rng << 13;
  rng ^= rng >> 7;
  rng ^= rng << 17;
  return rng;
}

int main(int argc, char **argv) {
  if (argc != 7) {
    fprintf(stderr, "usage: %s URI randwrite|write BS QD SECONDS SIZE\n", argv[0]);
    return 2;
  }
  const char *uri = argv[1];
  int random = strcmp(argv[2], "randwrite") == 0;
  size_t bs = strtoull(argv[3], NULL, 10);
  int qd = atoi(argv[4]);
  double seconds = atof(argv[5]);
  uint64_t size = strtoull(argv[6], NULL, 10);
  struct nbd_handle *h = nbd_create();
  if (!h || nbd_connect_uri(h, uri) == -1) {
    fprintf(stderr, "%s\n", nbd_get_error());
    return 1;
  }
  int64_t dev = nbd_get_size(h);
  if (dev > 0 && (uint64_t)dev < size) size = dev;
  if (nbd_can_fua(h) != 1) {
    fprintf(stderr, "the server does not support FUA\n");
    return 1;
  }
  uint64_t blocks = size / bs;
  char *buf = malloc(bs * qd);
  for (size_t i = 0; i < bs * qd; i++) buf[i] = (char)next();
  int64_t *cookies = calloc(qd, sizeof *cookies);
  double *started = calloc(qd, sizeof *started);
  size_t cap = 1 << 20, n = 0;
  double *lat = malloc(cap * sizeof *lat);
  uint64_t seq = 0, done = 0;
  double t0 = now(), end = t0 + seconds;
  for (int i = 0; i < qd; i++) cookies[i] = 0;
  for (;;) {
    double t = now();
    int stop = t >= end;
    int busy = 0;
    for (int i = 0; i < qd; i++) {
      if (cookies[i]) {
        int r = nbd_aio_command_completed(h, cookies[i]);
        if (r == -1) {
          fprintf(stderr, "write failed: %s\n", nbd_get_error());
          return 1;
        }
        if (r == 1) {
          cookies[i] = 0;
          done++;
          if (n == cap) lat = realloc(lat, (cap *= 2) * sizeof *lat);
          lat[n++] = t - started[i];
        } else {
          busy++;
        }
      }
      if (!cookies[i] && !stop) {
        uint64_t b = random ? next() % blocks : seq++ % blocks;
        started[i] = t;
        cookies[i] = nbd_aio_pwrite(h, buf + i * bs, bs, b * bs, NBD_NULL_COMPLETION, LIBNBD_CMD_FLAG_FUA);
        if (cookies[i] == -1) {
          fprintf(stderr, "%s\n", nbd_get_error());
          return 1;
        }
        busy++;
      }
    }
    if (stop && busy == 0) break;
    if (nbd_poll(h, 1000) == -1) {
      fprintf(stderr, "%s\n", nbd_get_error());
      return 1;
    }
  }
  double elapsed = now() - t0;
  qsort(lat, n, sizeof *lat, cmp);
  double iops = done / elapsed;
  printf("%.0f %.1f %.1f %.1f\n", iops, iops * bs / 1e6, n ? lat[n / 2] * 1e6 : 0, n ? lat[(size_t)(n * 0.99)] * 1e6 : 0);
  nbd_shutdown(h, 0);
  nbd_close(h);
  return 0;
}
