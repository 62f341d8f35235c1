// The host kernel's loops, compiled once per instruction set (no include guard, no includes).
//
// resize_host.cpp includes this file inside namespace `baseline` (the build's own flags: SSE2 on
// x86-64) and, on x86-64 with GCC or Clang, again inside namespace `avx2` under a target pragma;
// the CPU's features pick one at run time. Every header it uses is included before, outside the
// target region, so no library code is compiled for a newer CPU than the wheel's baseline.
//
// The arithmetic is Pillow's (resize_index.h, pillow-resample.md): acc = 2^21 + Σ_t w_t · byte in
// int32, then clip(acc >> 22). The loops are written for the compiler to vectorize: a fixed-size
// array of int32 accumulators over contiguous bytes, one weight per tap broadcast over all of them.
// - A vertical pass convolves rows: for every byte of the output row, the bytes below each other
//   in the window's rows (the whole row is one long vector, channels included).
// - A horizontal pass first transposes a block of kRows rows into columns (column x holds the
//   kRows·3 bytes of pixel x of every row, contiguous), so that the pass over a row becomes the
//   vertical pass's loop over columns with kRows·3 lanes: the window's columns are contiguous.
// Integer sums are exact in any order, so every lane gives the bytes Pillow gives.

constexpr int kRows = 16;                      // rows per horizontal block
constexpr int kLanes = 3 * kRows;              // accumulators per output column of a block
constexpr int64_t kColumnStride = kLanes + 4;  // bytes per transposed column (4-byte stores overrun by one)
constexpr int kChunk = 64;                     // bytes per accumulator array of a vertical pass

// out[k] = clip8(2^21 + Σ_t w[t] · src[t · stride + k]) for k < B.
template <int B>
inline void convolve(const uint8_t* src, int64_t stride, const int32_t* w, int32_t taps, uint8_t* out) {
#if defined(NVLM_HOST_LOOPS_AVX2)
  if constexpr (B % 8 == 0) {  // 8 lanes per register: vpmovzxbd straight from memory, vpmulld, vpaddd
    constexpr int kRegs = B / 8;
    __m256i acc[kRegs];
    for (int i = 0; i < kRegs; ++i) acc[i] = _mm256_set1_epi32(1 << (kPrecisionBits - 1));
    for (int32_t t = 0; t < taps; ++t) {
      const uint8_t* row = src + t * stride;
      const __m256i wt = _mm256_set1_epi32(w[t]);
      for (int i = 0; i < kRegs; ++i) {
        const __m256i px = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + 8 * i)));
        acc[i] = _mm256_add_epi32(acc[i], _mm256_mullo_epi32(px, wt));
      }
    }
    for (int i = 0; i < kRegs; ++i) {
      // acc >> 22 lies in [-512, 511]; the two saturating packs clip it to [0, 255] as clip8 does
      const __m256i v = _mm256_srai_epi32(acc[i], kPrecisionBits);
      const __m256i bytes = _mm256_packus_epi16(_mm256_packus_epi32(v, v), _mm256_setzero_si256());
      const __m128i lo = _mm256_castsi256_si128(bytes), hi = _mm256_extracti128_si256(bytes, 1);
      _mm_storel_epi64(reinterpret_cast<__m128i*>(out + 8 * i), _mm_unpacklo_epi32(lo, hi));
    }
    return;
  }
#endif
  int32_t acc[B];
  for (int k = 0; k < B; ++k) acc[k] = 1 << (kPrecisionBits - 1);
  for (int32_t t = 0; t < taps; ++t) {
    const uint8_t* row = src + t * stride;
    const int32_t wt = w[t];
    for (int k = 0; k < B; ++k) acc[k] += wt * static_cast<int32_t>(row[k]);
  }
  for (int k = 0; k < B; ++k) {
    const int32_t v = acc[k] >> kPrecisionBits;  // arithmetic shift: negative sums stay negative
    out[k] = static_cast<uint8_t>(v < 0 ? 0 : (v > 255 ? 255 : v));
  }
}

// One output row of a vertical pass: n bytes from the window's rows (row stride `stride`).
inline void vertical_row(const uint8_t* src, int64_t stride, const int32_t* w, int32_t taps, int64_t n, uint8_t* out) {
  int64_t k = 0;
  for (; k + kChunk <= n; k += kChunk) convolve<kChunk>(src + k, stride, w, taps, out + k);
  for (; k + 8 <= n; k += 8) convolve<8>(src + k, stride, w, taps, out + k);
  for (; k < n; ++k) convolve<1>(src + k, stride, w, taps, out + k);
}

#if defined(NVLM_HOST_LOOPS_AVX2)
// Both transpositions move 3-byte pixels of four rows by four pixels at a time: 16-byte loads
// whose pixels are spread to dwords (vpshufb), a 4x4 dword transpose, the dwords packed back to
// 12 bytes, and 16-byte stores whose last 4 bytes are rewritten by the next store (or land in
// padding). Element by element, a 4032-pixel row block cost about 9 ms per photo in 4-byte copies.
inline __m128i spread_pixels(__m128i v) {  // 4 pixels of 3 bytes -> 4 dwords (byte 3 is zero)
  return _mm_shuffle_epi8(v, _mm_setr_epi8(0, 1, 2, -1, 3, 4, 5, -1, 6, 7, 8, -1, 9, 10, 11, -1));
}
inline __m128i pack_pixels(__m128i v) {  // 4 dwords -> 4 pixels of 3 bytes, then 4 zero bytes
  return _mm_shuffle_epi8(v, _mm_setr_epi8(0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14, -1, -1, -1, -1));
}
inline __m128i load16(const uint8_t* p) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); }
inline void store16(uint8_t* p, __m128i v) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), v); }
// Four 16-byte loads at src + i · src_step (pixels of 3 bytes, or of 4 when !spread), the 4x4
// transpose of their first four pixels, and four 16-byte stores of 3-byte pixels at
// dst + i · dst_step (each one's last 4 bytes are zeros for a later store to overwrite).
inline void move_block_4x4(const uint8_t* src, int64_t src_step, bool spread, uint8_t* dst, int64_t dst_step) {
  __m128i a = load16(src), b = load16(src + src_step), c = load16(src + 2 * src_step), d = load16(src + 3 * src_step);
  if (spread) a = spread_pixels(a), b = spread_pixels(b), c = spread_pixels(c), d = spread_pixels(d);
  const __m128i ab_lo = _mm_unpacklo_epi32(a, b), ab_hi = _mm_unpackhi_epi32(a, b);
  const __m128i cd_lo = _mm_unpacklo_epi32(c, d), cd_hi = _mm_unpackhi_epi32(c, d);
  store16(dst, pack_pixels(_mm_unpacklo_epi64(ab_lo, cd_lo)));
  store16(dst + dst_step, pack_pixels(_mm_unpackhi_epi64(ab_lo, cd_lo)));
  store16(dst + 2 * dst_step, pack_pixels(_mm_unpacklo_epi64(ab_hi, cd_hi)));
  store16(dst + 3 * dst_step, pack_pixels(_mm_unpackhi_epi64(ab_hi, cd_hi)));
}
#endif

// columns[x · kColumnStride + r · 3 + c] = pixel x, channel c of row r, for x in [x0, x1), r < rows.
inline void transpose_rows(const HostImage& src, int32_t y0, int32_t rows, int32_t x0, int32_t x1, uint8_t* columns) {
  const int32_t step = src.step;
  int32_t simd_end = x0;  // rows below rows & ~3 are done up to here
#if defined(NVLM_HOST_LOOPS_AVX2)
  // A 16-byte load at pixel x stays in the row while x · step + 16 <= width · step.
  const int32_t load_end = std::min(x1, src.width - (step == 4 ? 0 : 2));
  for (; simd_end + 4 <= load_end; simd_end += 4) {
    const int32_t x = simd_end;
    for (int32_t r = 0; r + 4 <= rows; r += 4) {  // rows r..r+3 of pixels x..x+3 -> their columns
      move_block_4x4(src.data + (y0 + r) * src.stride + x * step, src.stride, step == 3,
                     columns + x * kColumnStride + r * 3, kColumnStride);
    }
  }
#endif
  // The rest pixel by pixel in 4-byte copies: the pixel's 3 bytes and one more, which lands in
  // the next row's slot (written after) or in the column's padding. A packed RGB row's last pixel
  // is copied bytewise, as its fourth byte may lie past the image.
  const int32_t wide_end = std::min(x1, step == 4 ? src.width : src.width - 1);
  for (int32_t r = 0; r < rows; ++r) {
    const uint8_t* row = src.data + (y0 + r) * src.stride;
    uint8_t* column = columns + r * 3;
    int32_t x = r < (rows & ~3) ? simd_end : x0;
    for (; x < wide_end; ++x) {
      uint32_t v;
      std::memcpy(&v, row + x * step, 4);
      std::memcpy(column + x * kColumnStride, &v, 4);
    }
    for (; x < x1; ++x) {
      for (int c = 0; c < 3; ++c) column[x * kColumnStride + c] = row[x * step + c];
    }
  }
}

// A horizontal pass of `rows` rows (rows <= kRows) from their transposed columns: output row r at
// out + r · out_stride, 3 bytes per pixel. The results come out as columns too (kLanes bytes per
// output pixel, in `packed`), then go to the rows with the same 4-byte copies as the transposition.
inline void horizontal_rows(const uint8_t* columns, const HostPass& pass, int32_t rows, uint8_t* packed,
                            uint8_t* out, int64_t out_stride) {
  for (int32_t x = 0; x < pass.size; ++x) {
    convolve<kLanes>(columns + pass.start[x] * kColumnStride, kColumnStride,
                     pass.weights + static_cast<int64_t>(x) * pass.window, pass.taps[x], packed + x * kLanes);
  }
  int32_t simd_end = 0;  // rows below rows & ~3 are done up to here
#if defined(NVLM_HOST_LOOPS_AVX2)
  // The 16-byte stores at pixel x write 4 bytes of pixels x + 4 and x + 5, which come later; the
  // loads read 4 bytes past a pixel's kLanes (the next pixel's, or the buffer's slack).
  for (; simd_end + 6 <= pass.size; simd_end += 4) {
    const int32_t x = simd_end;
    for (int32_t r = 0; r + 4 <= rows; r += 4) {  // pixels x..x+3 of rows r..r+3 -> the rows
      move_block_4x4(packed + x * kLanes + r * 3, kLanes, true, out + r * out_stride + x * 3, out_stride);
    }
  }
#endif
  for (int32_t r = 0; r < rows; ++r) {
    uint8_t* o = out + r * out_stride;
    const uint8_t* p = packed + r * 3;
    int32_t x = r < (rows & ~3) ? simd_end : 0;
    for (; x + 1 < pass.size; ++x) {  // the fourth byte is the next pixel's first, written next
      uint32_t v;
      std::memcpy(&v, p + x * kLanes, 4);
      std::memcpy(o + x * 3, &v, 4);
    }
    for (int c = 0; c < 3; ++c) o[x * 3 + c] = p[x * kLanes + c];
  }
}

// A vertical pass's output rows [y0, y1) of width `width`: row y at out + (y - y0) · out_stride,
// 3 bytes per pixel. A source with 4 bytes per pixel is convolved whole into `wide`, then packed.
inline void vertical_rows(const HostImage& src, const HostPass& pass, int32_t y0, int32_t y1, uint8_t* wide,
                          uint8_t* out, int64_t out_stride) {
  const int64_t n = static_cast<int64_t>(src.width) * src.step;
  for (int32_t y = y0; y < y1; ++y) {
    uint8_t* o = out + (y - y0) * out_stride;
    const uint8_t* window = src.data + pass.start[y] * src.stride;
    if (src.step == 3) {
      vertical_row(window, src.stride, pass.weights + static_cast<int64_t>(y) * pass.window, pass.taps[y], n, o);
    } else {
      vertical_row(window, src.stride, pass.weights + static_cast<int64_t>(y) * pass.window, pass.taps[y], n, wide);
      for (int32_t x = 0; x < src.width; ++x) {
        for (int c = 0; c < 3; ++c) o[x * 3 + c] = wide[x * 4 + c];
      }
    }
  }
}

// Rows [y0, y1) of the outputs of `count` passes over the same source (y1 - y0 <= kRows when
// horizontal; output i's row y at outs[i] + (y - y0) · strides[i], 3 bytes per pixel). Horizontal
// passes share one transposition of the rows (an image's grid and thumbnail read its rows once).
inline void pass_rows(const HostImage& src, const HostPass* passes, uint8_t* const* outs, const int64_t* strides,
                      int32_t count, int32_t y0, int32_t y1, HostScratch& scratch) {
  bool transposed = false;
  for (int32_t i = 0; i < count; ++i) {
    const HostPass& pass = passes[i];
    if (pass.axis == kAxisHorizontal) {
      if (!transposed) transpose_rows(src, y0, y1 - y0, 0, src.width, scratch.columns);
      transposed = true;
      horizontal_rows(scratch.columns, pass, y1 - y0, scratch.packed, outs[i], strides[i]);
    } else if (pass.axis == kAxisVertical) {
      vertical_rows(src, pass, y0, y1, scratch.wide, outs[i], strides[i]);
    } else {  // same size: Pillow copies
      for (int32_t y = y0; y < y1; ++y) {
        const uint8_t* row = src.data + y * src.stride;
        uint8_t* o = outs[i] + (y - y0) * strides[i];
        for (int32_t x = 0; x < src.width; ++x) {
          for (int c = 0; c < 3; ++c) o[x * 3 + c] = row[x * src.step + c];
        }
      }
    }
  }
}
