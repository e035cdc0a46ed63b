// AMX tiles, shared by the kernels that use them (attention_int8.c, decode_sdpa.c; the builds'
// cache keys hash every header of this folder, `native.kernel_headers`). Only for sources built with
// -mamx-tile -mamx-bf16 -mavx512bf16.
#ifndef ANDROMEDA_AMX_H
#define ANDROMEDA_AMX_H
#include <immintrin.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

// 1 where this process may use AMX tiles: Linux grants their state per process, on request, and
// refuses on a CPU or kernel without them.
static inline int amx_request(void) { return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0; }

typedef struct { uint8_t palette, start_row, reserved[14]; uint16_t colsb[16]; uint8_t rows[16]; } TileConfig;

// The calling thread's tiles 0 to count - 1 as 16 rows of 64 bytes (16 floats, or 32 bf16).
static inline void amx_configure(int count) {
  TileConfig config;
  memset(&config, 0, sizeof config);
  config.palette = 1;
  for (int t = 0; t < count; ++t) config.colsb[t] = 64, config.rows[t] = 16;
  _tile_loadconfig(&config);
}

#endif
