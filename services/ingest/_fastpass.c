/* The common case of ingest's per-record work as one compiled pass over a block of JSONL.
 *
 * For each line of a known shape (Alpaca, OpenAI messages, ShareGPT; plain ASCII and simple
 * escapes) it parses, normalises to the chat form, validates (turns, role order, empty turns,
 * length bounds), prefilters error text and PII, computes the exact key, the record id, the
 * split-order hash and writes the output line exactly as the Python path (orjson) does.
 * Every line it is not sure about is handed back, unchanged, to the Python path (the
 * reference): an unusual shape or key, an escape it does not decode, non-ASCII, a record that
 * would be rejected, a possible error text, a possible PII span. The prefilters are
 * supersets of what the Python checks act on (tests/unit/ingest/test_fastpass.py).
 *
 * Results come back as columns (bytes of packed integers, one blob of output lines), never
 * as a Python object per field.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#ifdef __SSE2__
#include <emmintrin.h>
#endif
/* An AVX-512 (BW + VBMI2) twin of the key stripping and lowercasing, chosen at import when
 * the CPU has it (``simd()``; x86-64 with GCC or Clang only). */
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define HAVE_AVX512_PATH 1
#endif
static int use_avx512;

#define XXH_INLINE_ALL
#include "xxhash.h"

typedef struct {
    char *p;
    size_t len, cap;
} buf_t;

static int buf_reserve(buf_t *b, size_t extra) {
    if (b->len + extra <= b->cap) return 0;
    size_t cap = b->cap ? b->cap : 4096;
    while (cap < b->len + extra) cap *= 2;
    char *p = realloc(b->p, cap);
    if (!p) return -1;
    b->p = p;
    b->cap = cap;
    return 0;
}

static int buf_put(buf_t *b, const void *data, size_t n) {
    if (buf_reserve(b, n)) return -1;
    memcpy(b->p + b->len, data, n);
    b->len += n;
    return 0;
}

static int buf_u32(buf_t *b, uint32_t v) { return buf_put(b, &v, 4); }


/* Byte classes. */
#define C_PLAIN 1   /* copied as is inside a JSON string */
#define C_PYSPACE 2 /* str.isspace() for ASCII */
#define C_KEYWS 4   /* removed for the exact key: b" \t\n\r\x0b\x0c" */
#define C_JSONWS 8  /* JSON whitespace */
#define C_RUN 16    /* [0-9 \-.()]: digit runs of PII candidates */
#define C_DIGIT 32
#define C_UPPER 64
#define C_HEX 128
#define C_MARK 256 /* '@' and ':' */

static uint16_t cls[256];
static uint8_t lower[256];

static void init_classes(void) {
    for (int c = 0; c < 256; c++) {
        uint16_t v = 0;
        if (c >= 0x20 && c < 0x80 && c != '"' && c != '\\') v |= C_PLAIN;
        if ((c >= 0x09 && c <= 0x0d) || (c >= 0x1c && c <= 0x20)) v |= C_PYSPACE;
        if (c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == 0x0b || c == 0x0c) v |= C_KEYWS;
        if (c == ' ' || c == '\t' || c == '\n' || c == '\r') v |= C_JSONWS;
        if ((c >= '0' && c <= '9') || c == ' ' || c == '-' || c == '.' || c == '(' || c == ')')
            v |= C_RUN;
        if (c >= '0' && c <= '9') v |= C_DIGIT;
        if (c >= 'A' && c <= 'Z') v |= C_UPPER;
        if ((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F'))
            v |= C_HEX;
        if (c == '@' || c == ':') v |= C_MARK;
        cls[c] = v;
        lower[c] = (uint8_t)((c >= 'A' && c <= 'Z') ? c + 32 : c);
    }
}

/* ------------------------------------------------------------------ parsing */

typedef struct {
    const unsigned char *p, *end;
} cur_t;

static void skip_ws(cur_t *c) {
    while (c->p < c->end && (cls[*c->p] & C_JSONWS)) c->p++;
}

static int hexval(unsigned char h) {
    if (h >= '0' && h <= '9') return h - '0';
    if (h >= 'a' && h <= 'f') return h - 'a' + 10;
    if (h >= 'A' && h <= 'F') return h - 'A' + 10;
    return -1;
}

/* The first byte from ``p`` that is not C_PLAIN (or ``end``): 16 bytes at a time where SSE2
 * is there (a byte below 0x20 as a signed char is a control byte or one of 0x80-0xff). */
static inline const unsigned char *plain_end(const unsigned char *p, const unsigned char *end) {
#ifdef __SSE2__
    while (end - p >= 16) {
        __m128i v = _mm_loadu_si128((const __m128i *)p);
        __m128i bad = _mm_or_si128(_mm_cmplt_epi8(v, _mm_set1_epi8(0x20)),
                                   _mm_or_si128(_mm_cmpeq_epi8(v, _mm_set1_epi8('"')),
                                                _mm_cmpeq_epi8(v, _mm_set1_epi8('\\'))));
        unsigned mask = (unsigned)_mm_movemask_epi8(bad);
        if (mask) return p + __builtin_ctz(mask);
        p += 16;
    }
#endif
    while (p < end && (cls[*p] & C_PLAIN)) p++;
    return p;
}

#ifdef __SSE2__
/* Bytes a <= v <= b, for a and b in 0x00-0x7f (a signed compare: 0x80-0xff never match). */
static inline __m128i in_range(__m128i v, char a, char b) {
    return _mm_and_si128(_mm_cmpgt_epi8(v, _mm_set1_epi8((char)(a - 1))),
                         _mm_cmplt_epi8(v, _mm_set1_epi8((char)(b + 1))));
}

/* The key's whitespace (C_KEYWS: 0x09-0x0d and ' ') among 16 bytes, as a bit mask. */
static inline unsigned keyws_mask(__m128i v) {
    return (unsigned)_mm_movemask_epi8(
        _mm_or_si128(in_range(v, 0x09, 0x0d), _mm_cmpeq_epi8(v, _mm_set1_epi8(' '))));
}
#endif

#ifdef HAVE_AVX512_PATH
#define AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512vbmi2,popcnt")))

AVX512_TARGET static inline __mmask64 keyws_mask64(__m512i v) {
    return _mm512_cmple_epu8_mask(_mm512_sub_epi8(v, _mm512_set1_epi8(0x09)), _mm512_set1_epi8(4))
           | _mm512_cmpeq_epi8_mask(v, _mm512_set1_epi8(' '));
}

/* As strip_copy; ``o`` needs room for n + 64 bytes, ``s`` is read up to s + n only. */
AVX512_TARGET static size_t strip_copy_avx512(char *o, const char *s, size_t n) {
    char *start = o;
    for (size_t k = 0; k < n; k += 64) {
        __mmask64 valid = n - k >= 64 ? ~0ull : (1ull << (n - k)) - 1;
        __m512i v = _mm512_maskz_loadu_epi8(valid, s + k);
        __mmask64 keep = ~keyws_mask64(v) & valid;
        _mm512_storeu_si512((void *)o, _mm512_maskz_compress_epi8(keep, v));
        o += _mm_popcnt_u64(keep);
    }
    return (size_t)(o - start);
}

AVX512_TARGET static void lower_copy_avx512(char *o, const char *s, size_t n) {
    for (size_t k = 0; k < n; k += 64) {
        __mmask64 valid = n - k >= 64 ? ~0ull : (1ull << (n - k)) - 1;
        __m512i v = _mm512_maskz_loadu_epi8(valid, s + k);
        __mmask64 up = _mm512_cmple_epu8_mask(_mm512_sub_epi8(v, _mm512_set1_epi8('A')),
                                              _mm512_set1_epi8('Z' - 'A'));
        _mm512_mask_storeu_epi8(o + k, valid,
                                _mm512_mask_add_epi8(v, up, v, _mm512_set1_epi8(0x20)));
    }
}
#endif

/* Which twin runs: "avx512" where the CPU (and the OS) has AVX-512 BW and VBMI2, else
 * "sse2" (or plain C); tests force "sse2" to check it on the same machine. */
static int avx512_available(void) {
#ifdef HAVE_AVX512_PATH
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vbmi2");
#else
    return 0;
#endif
}

/* ``n`` bytes of ``s`` lowercased (ASCII A-Z only, as ``lower``) into ``o``. */
static inline void lower_copy(char *o, const char *s, size_t n) {
#ifdef HAVE_AVX512_PATH
    if (use_avx512) {
        lower_copy_avx512(o, s, n);
        return;
    }
#endif
    size_t k = 0;
#ifdef __SSE2__
    for (; k + 16 <= n; k += 16) {
        __m128i v = _mm_loadu_si128((const __m128i *)(s + k));
        __m128i up = _mm_and_si128(in_range(v, 'A', 'Z'), _mm_set1_epi8(0x20));
        _mm_storeu_si128((__m128i *)(o + k), _mm_add_epi8(v, up));
    }
#endif
    for (; k < n; k++) o[k] = (char)lower[(unsigned char)s[k]];
}

/* ``s`` without the key's whitespace (C_KEYWS) into ``o``; the length written. ``o`` needs
 * room for n + 64 bytes and ``s`` must be readable up to s + n + 16 (both buffers are
 * reserved with that slack): each word is copied with one 16-byte store, not byte by byte. */
static inline size_t strip_copy(char *o, const char *s, size_t n) {
#ifdef HAVE_AVX512_PATH
    if (use_avx512) return strip_copy_avx512(o, s, n);
#endif
    char *start = o;
    size_t k = 0;
#ifdef __SSE2__
    for (; k + 16 <= n; k += 16) {
        __m128i v = _mm_loadu_si128((const __m128i *)(s + k));
        unsigned keep = ~keyws_mask(v) & 0xffffu;
        if (keep == 0xffffu) {
            _mm_storeu_si128((__m128i *)o, v);
            o += 16;
            continue;
        }
        while (keep) { /* each run of kept bytes: one store from where it starts */
            unsigned a = (unsigned)__builtin_ctz(keep);
            unsigned len = (unsigned)__builtin_ctz(~(keep >> a));
            _mm_storeu_si128((__m128i *)o, _mm_loadu_si128((const __m128i *)(s + k + a)));
            o += len;
            keep &= ~((2u << (a + len - 1)) - 1u);
        }
    }
#endif
    for (; k < n; k++) {
        char ch = s[k];
        *o = ch;
        o += !(cls[(unsigned char)ch] & C_KEYWS);
    }
    return (size_t)(o - start);
}

/* A JSON string (c->p at the opening quote), decoded into ``out``. 0 = done, -1 = not sure
 * (non-ASCII, an escape outside ASCII, a raw control byte, NUL, end of line), -2 = no memory. */
static int parse_string(cur_t *c, buf_t *out) {
    const unsigned char *p = c->p + 1, *end = c->end;
    for (;;) {
        const unsigned char *s = p;
        p = plain_end(p, end);
        if (p > s && buf_put(out, s, (size_t)(p - s))) return -2;
        if (p >= end) return -1;
        unsigned char ch = *p;
        if (ch == '"') {
            c->p = p + 1;
            return 0;
        }
        if (ch != '\\' || p + 1 >= end) return -1; /* raw control or non-ASCII byte */
        char d;
        switch (p[1]) {
        case '"': d = '"'; break;
        case '\\': d = '\\'; break;
        case '/': d = '/'; break;
        case 'b': d = '\b'; break;
        case 'f': d = '\f'; break;
        case 'n': d = '\n'; break;
        case 'r': d = '\r'; break;
        case 't': d = '\t'; break;
        case 'u': {
            if (p + 6 > end) return -1;
            int v = 0;
            for (int i = 2; i < 6; i++) {
                int h = hexval(p[i]);
                if (h < 0) return -1;
                v = v * 16 + h;
            }
            if (v == 0 || v >= 0x80) return -1;
            d = (char)v;
            p += 4;
            break;
        }
        default: return -1;
        }
        if (buf_put(out, &d, 1)) return -2;
        p += 2;
    }
}

/* ``null`` at c->p? */
static int take_null(cur_t *c) {
    if (c->end - c->p >= 4 && memcmp(c->p, "null", 4) == 0) {
        c->p += 4;
        return 1;
    }
    return 0;
}

/* A short object key (plain ASCII, no escapes) into ``key``; its length, or -1. */
static int parse_key(cur_t *c, char *key, int cap) {
    if (c->p >= c->end || *c->p != '"') return -1;
    const unsigned char *p = c->p + 1;
    int n = 0;
    while (p < c->end && *p != '"') {
        if (!(cls[*p] & C_PLAIN) || n >= cap - 1) return -1;
        key[n++] = (char)*p++;
    }
    if (p >= c->end) return -1;
    key[n] = 0;
    c->p = p + 1;
    skip_ws(c);
    if (c->p >= c->end || *c->p != ':') return -1;
    c->p++;
    skip_ws(c);
    return n;
}

/* A string field: offset/length in the arena (set when the value is a string). */
typedef struct {
    int seen;   /* the key was there */
    int isstr;  /* its value was a string (else null) */
    size_t off, len;
} field_t;

enum { R_SYSTEM = 0, R_USER = 1, R_ASSISTANT = 2 };
static const char *ROLE_NAME[3] = {"system", "user", "assistant"};
static const size_t ROLE_LEN[3] = {6, 4, 9};

typedef struct {
    int role;
    size_t off, len; /* in the arena */
} msg_t;

typedef struct {
    msg_t *m;
    size_t n, cap;
} msgs_t;

static int msgs_push(msgs_t *ms, int role, size_t off, size_t len) {
    if (ms->n == ms->cap) {
        size_t cap = ms->cap ? ms->cap * 2 : 16;
        msg_t *m = realloc(ms->m, cap * sizeof(msg_t));
        if (!m) return -2;
        ms->m = m;
        ms->cap = cap;
    }
    ms->m[ms->n].role = role;
    ms->m[ms->n].off = off;
    ms->m[ms->n].len = len;
    ms->n++;
    return 0;
}

static int parse_str_field(cur_t *c, field_t *f, buf_t *arena, int nullable) {
    if (f->seen) return -1; /* a duplicate key: orjson keeps the last, leave it to Python */
    f->seen = 1;
    if (c->p < c->end && *c->p == '"') {
        f->off = arena->len;
        int r = parse_string(c, arena);
        if (r) return r;
        f->len = arena->len - f->off;
        f->isstr = 1;
        return 0;
    }
    if (nullable && take_null(c)) return 0;
    return -1;
}

static int speaker_role(const char *s, size_t n) {
    char low[16];
    if (n == 0 || n >= sizeof low) return -1;
    for (size_t i = 0; i < n; i++) {
        char ch = s[i];
        low[i] = (ch >= 'A' && ch <= 'Z') ? (char)(ch + 32) : ch;
    }
    low[n] = 0;
    static const struct { const char *name; int role; } T[] = {
        {"human", R_USER}, {"user", R_USER}, {"gpt", R_ASSISTANT}, {"assistant", R_ASSISTANT},
        {"chatgpt", R_ASSISTANT}, {"bard", R_ASSISTANT}, {"bing", R_ASSISTANT},
        {"model", R_ASSISTANT}, {"system", R_SYSTEM},
    };
    for (size_t i = 0; i < sizeof T / sizeof T[0]; i++)
        if (strcmp(low, T[i].name) == 0) return T[i].role;
    return -1;
}

/* The messages array (c->p at '['): openai {role, content} or sharegpt {from, value}. */
static int parse_turns(cur_t *c, int sharegpt, buf_t *arena, msgs_t *ms) {
    c->p++;
    skip_ws(c);
    if (c->p < c->end && *c->p == ']') {
        c->p++;
        return 0;
    }
    for (;;) {
        if (c->p >= c->end || *c->p != '{') return -1;
        c->p++;
        skip_ws(c);
        field_t role = {0}, content = {0};
        if (c->p < c->end && *c->p == '}') return -1; /* no role: Python rejects it */
        for (;;) {
            char key[16];
            if (parse_key(c, key, sizeof key) < 0) return -1;
            int r;
            if (strcmp(key, sharegpt ? "from" : "role") == 0)
                r = parse_str_field(c, &role, arena, 0);
            else if (strcmp(key, sharegpt ? "value" : "content") == 0)
                r = parse_str_field(c, &content, arena, 0);
            else
                return -1;
            if (r) return r;
            skip_ws(c);
            if (c->p < c->end && *c->p == ',') {
                c->p++;
                skip_ws(c);
                continue;
            }
            if (c->p < c->end && *c->p == '}') {
                c->p++;
                break;
            }
            return -1;
        }
        if (!role.isstr || !content.isstr) return -1;
        int code;
        const char *name = arena->p + role.off;
        if (sharegpt) {
            code = speaker_role(name, role.len);
        } else {
            code = -1;
            for (int k = 0; k < 3; k++)
                if (role.len == ROLE_LEN[k] && memcmp(name, ROLE_NAME[k], role.len) == 0) code = k;
        }
        if (code < 0) return -1;
        int r = msgs_push(ms, code, content.off, content.len);
        if (r) return r;
        skip_ws(c);
        if (c->p < c->end && *c->p == ',') {
            c->p++;
            skip_ws(c);
            continue;
        }
        if (c->p < c->end && *c->p == ']') {
            c->p++;
            return 0;
        }
        return -1;
    }
}

enum { F_AUTO = 0, F_ALPACA = 1, F_OPENAI = 2, F_SHAREGPT = 3 };

typedef struct {
    field_t instruction, input, output, system, category, domain, source, id;
    int has_messages, has_conversations;
    size_t turns_start, turns_end; /* messages parsed from this array, in ms */
} record_t;

/* ------------------------------------------------------------------ checks */

static int is_pyspace_all(const char *s, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (!(cls[(unsigned char)s[i]] & C_PYSPACE)) return 0;
    return 1;
}

#ifdef __SSE2__
/* Digits, '@' and ':' among the 64 bytes from ``p``, as a bit mask. */
static inline uint64_t pii_marks64(const unsigned char *p) {
    uint64_t marks = 0;
    for (int k = 0; k < 4; k++) {
        __m128i v = _mm_loadu_si128((const __m128i *)(p + 16 * k));
        __m128i hit = _mm_or_si128(in_range(v, '0', '9'),
                                   _mm_or_si128(_mm_cmpeq_epi8(v, _mm_set1_epi8('@')),
                                                _mm_cmpeq_epi8(v, _mm_set1_epi8(':'))));
        marks |= (uint64_t)(unsigned)_mm_movemask_epi8(hit) << (16 * k);
    }
    return marks;
}

/* The first digit, '@' or ':' at or after ``i`` (or ``n``): 64 bytes at a time, the last
 * ones through a window that ends at ``n`` (or a zeroed copy of a short text). */
static inline size_t next_pii_mark(const unsigned char *s, size_t i, size_t n) {
    for (; i + 64 <= n; i += 64) {
        uint64_t marks = pii_marks64(s + i);
        if (marks) return i + (size_t)__builtin_ctzll(marks);
    }
    if (i >= n) return n;
    uint64_t marks;
    if (n >= 64) {
        marks = pii_marks64(s + n - 64) >> (64 - (n - i));
    } else {
        unsigned char tail[64] = {0};
        memcpy(tail, s + i, n - i);
        marks = pii_marks64(tail);
    }
    return marks ? i + (size_t)__builtin_ctzll(marks) : n;
}
#endif

/* Could the PII scrubber change anything in this text? A superset of its candidates that it
 * can act on: '@' (email), two capitals then two digits (IBAN), two colons with at most four
 * hex digits between them (IPv6), a run of [0-9 -.()] of at least 7 bytes (the digit-run
 * candidate) holding at least 9 digits (SSN, card, phone) or 4 digits and 3 dots (IPv4). */
static int pii_candidate(const unsigned char *s, size_t n) {
    size_t i = 0;
    while (i < n) {
        /* To the next digit, '@' or ':': 64 bytes at a time, straight to the first one (text
         * has one every ~50-100 bytes, in numbers and words like "q3"). */
#ifdef __SSE2__
        i = next_pii_mark(s, i, n);
#else
        while (i < n && !(cls[s[i]] & (C_DIGIT | C_MARK))) i++;
#endif
        if (i >= n) return 0;
        if (s[i] == '@') return 1;
        if (s[i] == ':') {
            size_t j = i + 1;
            while (j < n && j <= i + 4 && (cls[s[j]] & C_HEX)) j++;
            if (j < n && s[j] == ':') return 1;
            i++;
            continue;
        }
        /* A digit: the maximal run of [0-9 -.()] around it (none of its bytes before ``i``
         * is a digit: they were skipped above). */
        size_t start = i;
        while (start > 0 && (cls[s[start - 1]] & C_RUN)) start--;
        size_t digits = 0, dots = 0;
        for (; i < n && (cls[s[i]] & C_RUN); i++) {
            dots += s[i] == '.';
            if (!(cls[s[i]] & C_DIGIT)) continue;
            digits++;
            if (i >= 3 && (cls[s[i - 1]] & C_DIGIT) && (cls[s[i - 2]] & C_UPPER)
                && (cls[s[i - 3]] & C_UPPER))
                return 1; /* two capitals, two digits: an IBAN start */
        }
        /* SSN 9 digits, card 13+, phone 10+, IPv4 4+ digits and 3 dots: a date or a range
         * of years is not a candidate. */
        if (i - start >= 7 && (digits >= 9 || (digits >= 4 && dots >= 3))) return 1;
    }
    return 0;
}

/* Literals (lowercase) of which every match of validate.ERROR_TEXT contains at least one
 * ("m sorry" is in both "i'm sorry" and "im sorry"). Each has at least 7 bytes, so the scan
 * below need look at every fourth offset only. */
static const char *ERROR_LITERALS[] = {
    "traceback (most recent call last)", "m sorry", "i apologi", "as an ai language model",
    "openai.", "limit reached", "limit exceeded", "insufficient_quota",
    "context_length_exceeded", "invalid_request_error", "internal server error",
    "service unavailable", "bad gateway", "gateway timeout", "error code: ", "\"error\":",
};
#define N_ERROR_LITERALS (sizeof ERROR_LITERALS / sizeof ERROR_LITERALS[0])
_Static_assert(N_ERROR_LITERALS <= 16, "error_which holds 4 bits per literal");
static size_t error_len[N_ERROR_LITERALS];
/* The four-byte windows at offsets 0-3 of each literal, hashed to 16 bits, as a bit set (8 KB:
 * in cache), and for each hash which literals at which offsets have it (bit 4 * k + offset),
 * looked at only on a hit: common windows (" an ", "text", "open") then cost one comparison,
 * not one per literal and offset. */
static uint8_t error_prefix[8192];
static uint64_t error_which[65536];

static inline unsigned prefix_hash(const unsigned char *p) {
    uint32_t x;
    memcpy(&x, p, 4);
    return (x * 0x9E3779B1u) >> 16;
}

static void init_error_literals(void) {
    for (size_t k = 0; k < N_ERROR_LITERALS; k++) {
        const unsigned char *lit = (const unsigned char *)ERROR_LITERALS[k];
        error_len[k] = strlen(ERROR_LITERALS[k]);
        /* Bytes 0-3 to 3-6 (every literal has at least 7): a literal at any offset contains
         * the window at the next multiple of four, so only those offsets are looked at. */
        for (int at = 0; at < 4; at++) {
            unsigned h = prefix_hash(lit + at);
            error_prefix[h >> 3] |= (uint8_t)(1u << (h & 7));
            error_which[h] |= 1ull << (4 * k + (size_t)at);
        }
    }
}

/* In lowercased text. */
static int error_candidate(const char *text, size_t n) {
    const unsigned char *s = (const unsigned char *)text;
    for (size_t i = 0; i + 4 <= n; i += 4) {
        unsigned h = prefix_hash(s + i);
        if (__builtin_expect(!(error_prefix[h >> 3] & (1u << (h & 7))), 1)) continue;
        for (uint64_t w = error_which[h]; w; w &= w - 1) {
            size_t bit = (size_t)__builtin_ctzll(w), k = bit >> 2, off = bit & 3;
            if (off <= i && i - off + error_len[k] <= n
                && memcmp(s + i - off, ERROR_LITERALS[k], error_len[k]) == 0)
                return 1;
        }
    }
    return 0;
}

/* ------------------------------------------------------------------ writing */

static const char HEX[] = "0123456789abcdef";

/* ``s`` as orjson writes a string (ASCII input), quotes included. */
static int put_json_string(buf_t *b, const char *s, size_t n) {
    if (buf_reserve(b, 6 * n + 2)) return -2;
    char *o = b->p + b->len;
    *o++ = '"';
    for (size_t i = 0; i < n; i++) {
#ifdef __SSE2__
        /* 16 bytes at a time up to the next one to escape (most text has one only every line
         * or so); the store may run past it: the buffer has room for 6 bytes per input byte. */
        while (i + 16 <= n) {
            __m128i v = _mm_loadu_si128((const __m128i *)(s + i));
            __m128i bad = _mm_or_si128(_mm_cmplt_epi8(v, _mm_set1_epi8(0x20)), /* and >= 0x80 */
                                       _mm_or_si128(_mm_cmpeq_epi8(v, _mm_set1_epi8('"')),
                                                    _mm_cmpeq_epi8(v, _mm_set1_epi8('\\'))));
            unsigned mask = (unsigned)_mm_movemask_epi8(bad);
            _mm_storeu_si128((__m128i *)o, v);
            if (mask) {
                unsigned k = (unsigned)__builtin_ctz(mask);
                o += k;
                i += k;
                break;
            }
            o += 16;
            i += 16;
        }
        if (i == n) break;
#endif
        unsigned char ch = (unsigned char)s[i];
        if (cls[ch] & C_PLAIN) {
            *o++ = (char)ch;
            continue;
        }
        *o++ = '\\';
        switch (ch) {
        case '"': *o++ = '"'; break;
        case '\\': *o++ = '\\'; break;
        case '\b': *o++ = 'b'; break;
        case '\t': *o++ = 't'; break;
        case '\n': *o++ = 'n'; break;
        case '\f': *o++ = 'f'; break;
        case '\r': *o++ = 'r'; break;
        default:
            *o++ = 'u';
            *o++ = '0';
            *o++ = '0';
            *o++ = HEX[ch >> 4];
            *o++ = HEX[ch & 15];
        }
    }
    *o++ = '"';
    b->len = (size_t)(o - b->p);
    return 0;
}

/* A label (category, domain, source, id) usable as is: label() would return it unchanged
 * (1..200 chars, nothing for strip() to remove). */
static int clean_label(const char *s, size_t n) {
    return n >= 1 && n <= 200 && !(cls[(unsigned char)s[0]] & C_PYSPACE)
           && !(cls[(unsigned char)s[n - 1]] & C_PYSPACE);
}

/* ------------------------------------------------------------------ MinHash */

/* dedupe.signatures for one text, in C, bit for bit: word hashes are polynomial hashes mod
 * 2**32 (base 0x100000001B3 mod 2**32), words are runs of bytes > 32, shingles of three words
 * (fewer: one shingle of all of them), each shingle salted and mixed into two of the bins
 * (one-permutation hashing), empty bins densified along the same probe sequence. */
#define MH_EMPTY 0xFFFFFFFFu
static const uint64_t MH_C1 = 0x9FB21C651E98DF25ull, MH_C2 = 0xD6E8FEB86659FD93ull,
                      MH_C3 = 0xCA5A826395121157ull;

static inline uint64_t mix64(uint64_t h) {
    h ^= h >> 33;
    h *= 0xFF51AFD7ED558CCDull;
    h ^= h >> 33;
    h *= 0xC2B2AE3D27D4EB4Full;
    h ^= h >> 29;
    return h;
}

typedef struct {
    int num_perm;
    uint64_t salt;
    const int32_t *probes; /* [rounds][num_perm] */
    int rounds;
} sketch_t;

static inline void mh_add(const sketch_t *k, uint32_t *sig, uint64_t h) {
    uint64_t s = h ^ k->salt;
    for (int r = 0; r < 2; r++) {
        s = mix64(s);
        uint64_t bin = ((s >> 32) * (uint64_t)k->num_perm) >> 32;
        uint32_t v = (uint32_t)s;
        if (v < sig[bin]) sig[bin] = v;
    }
}

/* Scratch kept between calls (the GIL is held): powers of the word-hash base, word hashes. */
static uint32_t *mh_pow;
static size_t mh_pow_len;
static uint32_t *mh_words;
static size_t mh_words_len;

static int mh_reserve(size_t n) {
    if (mh_pow_len < n + 1) {
        size_t len = n + 1 > 2 * mh_pow_len ? n + 1 : 2 * mh_pow_len;
        uint32_t *pw = realloc(mh_pow, len * sizeof(uint32_t));
        if (!pw) return -1;
        size_t k = mh_pow_len;
        if (k == 0) pw[k++] = 1;
        for (; k < len; k++) pw[k] = pw[k - 1] * 0x1B3u;
        mh_pow = pw;
        mh_pow_len = len;
    }
    if (mh_words_len < n / 2 + 2) {
        size_t len = n / 2 + 2 > 2 * mh_words_len ? n / 2 + 2 : 2 * mh_words_len;
        uint32_t *w = realloc(mh_words, len * sizeof(uint32_t));
        if (!w) return -1;
        mh_words = w;
        mh_words_len = len;
    }
    return 0;
}

static int minhash(const sketch_t *k, const unsigned char *t, size_t n, uint32_t *sig,
                   uint32_t *source) {
    int P = k->num_perm;
    for (int c = 0; c < P; c++) sig[c] = MH_EMPTY;
    if (mh_reserve(n)) return -2;
    /* Word hashes without a branch per byte (word lengths vary: branches would mispredict
     * once or twice a word): every byte stores the running hash at the word count, which
     * moves on just after a word ends; the power comes from a table by position in the
     * word. */
    const uint32_t *pw = mh_pow;
    uint32_t *words = mh_words;
    uint32_t h = 0, prev = 0;
    size_t pos = 0, nw = 0;
    for (size_t i = 0; i < n; i++) {
        uint32_t c = t[i], w = c > 32, m = 0u - w;
        words[nw] = h;
        nw += prev & (w ^ 1u);
        pos = (pos + 1) & (size_t)(0 - (size_t)prev);
        h = (h + c * pw[pos]) & m;
        prev = w;
    }
    words[nw] = h;
    nw += prev;
    for (size_t i = 2; i < nw; i++)
        mh_add(k, sig, (uint64_t)words[i - 2] * MH_C1 + (uint64_t)words[i - 1] * MH_C2
                           + (uint64_t)words[i] * MH_C3);
    if (nw == 1) mh_add(k, sig, (uint64_t)words[0] * MH_C1);
    else if (nw == 2) mh_add(k, sig, (uint64_t)words[0] * MH_C1 + (uint64_t)words[1] * MH_C2);
    if (nw == 0) return 0;
    memcpy(source, sig, (size_t)P * sizeof(uint32_t));
    for (int c = 0; c < P; c++) {
        if (source[c] != MH_EMPTY) continue;
        int done = 0;
        for (int r = 0; r < k->rounds && !done; r++) {
            uint32_t v = source[k->probes[r * P + c]];
            if (v != MH_EMPTY) sig[c] = v, done = 1;
        }
        for (int d = 1; d < P && !done; d++) {
            uint32_t v = source[(c + d) % P];
            if (v != MH_EMPTY) sig[c] = v, done = 1;
        }
    }
    return 0;
}

/* ------------------------------------------------------------------ the pass */

typedef struct {
    int fmt, trusted;
    long min_in, max_in, min_out, max_out, max_turns;
    int check_error, check_pii, want_sketch;
    sketch_t sketch;
    uint64_t seed;
    size_t max_record;
} rules_t;

typedef struct {
    buf_t fast, slow, slow_spans, lines, line_bytes, keys, order, in_chars, out_chars, sigs, source;
    buf_t scrub_idx, scrub_spans, scrub, scrub_in, scrub_out;
    buf_t arena, joined, stripped;
    msgs_t ms;
    PyObject *ids, *cats, *srcs;
} state_t;

/* One line. 1 = done here (columns appended), 2 = done but for the PII scrub (the record in
 * chat form appended to ``scrub``), 0 = hand to Python, -2 = no memory / error. */
static int one_line(state_t *st, const rules_t *ru, const unsigned char *line, size_t n,
                    PyObject *def_cat, PyObject *def_src, const char *cat_json, size_t cat_json_n,
                    const char *src_json, size_t src_json_n) {
    if (n > ru->max_record) return 0;
    buf_t *arena = &st->arena;
    arena->len = 0;
    st->ms.n = 0;
    record_t r;
    memset(&r, 0, sizeof r);
    cur_t c = {line, line + n};
    skip_ws(&c);
    if (c.p >= c.end || *c.p != '{') return 0;
    c.p++;
    skip_ws(&c);
    if (c.p < c.end && *c.p == '}') return 0;
    for (;;) {
        char key[16];
        if (parse_key(&c, key, sizeof key) < 0) return 0;
        int res;
        field_t *f = NULL;
        int nullable = 1;
        if (strcmp(key, "messages") == 0 || strcmp(key, "conversations") == 0) {
            int sharegpt = key[0] == 'c';
            if (r.has_messages || r.has_conversations) return 0;
            if (sharegpt) r.has_conversations = 1; else r.has_messages = 1;
            if (c.p >= c.end || *c.p != '[') return 0;
            res = parse_turns(&c, sharegpt, arena, &st->ms);
            if (res == -2) return -2;
            if (res) return 0;
        } else {
            if (strcmp(key, "instruction") == 0) f = &r.instruction, nullable = 0;
            else if (strcmp(key, "input") == 0) f = &r.input;
            else if (strcmp(key, "output") == 0) f = &r.output, nullable = 0;
            else if (strcmp(key, "system") == 0) f = &r.system;
            else if (strcmp(key, "category") == 0) f = &r.category;
            else if (strcmp(key, "domain") == 0) f = &r.domain;
            else if (strcmp(key, "source") == 0) f = &r.source;
            else if (strcmp(key, "id") == 0) f = &r.id;
            else return 0;
            res = parse_str_field(&c, f, arena, nullable);
            if (res == -2) return -2;
            if (res) return 0;
        }
        skip_ws(&c);
        if (c.p < c.end && *c.p == ',') {
            c.p++;
            skip_ws(&c);
            continue;
        }
        if (c.p < c.end && *c.p == '}') {
            c.p++;
            break;
        }
        return 0;
    }
    skip_ws(&c);
    if (c.p != c.end) return 0;

    /* The format, as detect_format/normalise decide it; any key the format ignores → Python. */
    int fmt = ru->trusted ? F_OPENAI : ru->fmt;
    int alpaca_keys = r.instruction.seen || r.input.seen || r.output.seen || r.system.seen;
    if (fmt == F_AUTO) {
        if (r.has_messages) fmt = F_OPENAI;
        else if (r.has_conversations) fmt = F_SHAREGPT;
        else if (r.instruction.seen && r.output.seen) fmt = F_ALPACA;
        else return 0;
    }
    if (fmt == F_ALPACA) {
        if (r.has_messages || r.has_conversations) return 0;
        if (!r.instruction.isstr || !r.output.isstr) return 0;
        if (r.system.isstr && r.system.len)
            if (msgs_push(&st->ms, R_SYSTEM, r.system.off, r.system.len)) return -2;
        if (r.input.isstr && r.input.len) {
            size_t off = arena->len;
            if (buf_reserve(arena, r.instruction.len + 2 + r.input.len)) return -2;
            buf_put(arena, arena->p + r.instruction.off, r.instruction.len);
            buf_put(arena, "\n\n", 2);
            buf_put(arena, arena->p + r.input.off, r.input.len);
            if (msgs_push(&st->ms, R_USER, off, arena->len - off)) return -2;
        } else if (msgs_push(&st->ms, R_USER, r.instruction.off, r.instruction.len)) {
            return -2;
        }
        if (msgs_push(&st->ms, R_ASSISTANT, r.output.off, r.output.len)) return -2;
    } else {
        if (alpaca_keys) return 0;
        if (fmt == F_OPENAI ? !r.has_messages || r.has_conversations
                            : !r.has_conversations || r.has_messages)
            return 0;
    }
    msg_t *m = st->ms.m;
    size_t nm = st->ms.n;
    if (nm == 0) return 0;

    /* Validation: anything it would reject is left to Python, which says why. */
    if (!ru->trusted) {
        if ((long)nm > ru->max_turns || nm < 2) return 0;
        size_t start = m[0].role == R_SYSTEM ? 1 : 0;
        if (nm - start < 2 || (nm - start) % 2) return 0;
        for (size_t i = start; i < nm; i++)
            if (m[i].role != (((i - start) % 2) ? R_ASSISTANT : R_USER)) return 0;
    }
    long in_chars = 0, out_chars = 0;
    for (size_t i = 0; i < nm; i++) {
        const char *s = arena->p + m[i].off;
        if (m[i].len == 0 || is_pyspace_all(s, m[i].len)) return 0;
        if (m[i].role == R_ASSISTANT) out_chars += (long)m[i].len;
        else in_chars += (long)m[i].len;
    }
    if (!ru->trusted) {
        if (in_chars < ru->min_in || in_chars > ru->max_in) return 0;
        if (out_chars < ru->min_out || out_chars > ru->max_out) return 0;
    }
    /* A possible PII span: all but the scrub is done here; see ``scrub`` below. */
    int pii = 0;
    if (!ru->trusted && ru->check_pii)
        for (size_t i = 0; i < nm && !pii; i++)
            pii = pii_candidate((const unsigned char *)arena->p + m[i].off, m[i].len);
    /* Labels: used only when label() would return them unchanged. */
    const field_t *cat = NULL, *src = NULL;
    if (r.category.seen && r.category.isstr) {
        if (!clean_label(arena->p + r.category.off, r.category.len)) return 0;
        cat = &r.category;
    } else if (r.domain.seen && r.domain.isstr) {
        if (!clean_label(arena->p + r.domain.off, r.domain.len)) return 0;
        cat = &r.domain;
    }
    if (r.source.seen && r.source.isstr) {
        if (!clean_label(arena->p + r.source.off, r.source.len)) return 0;
        src = &r.source;
    }
    if (ru->trusted && r.id.seen && r.id.isstr && !clean_label(arena->p + r.id.off, r.id.len))
        return 0;

    /* The conversation text (dedupe.conversation_text): "role: content" lowercased, joined by
     * newlines; error text is looked for in the answers' part of it. */
    buf_t *text = &st->joined;
    text->len = 0;
    for (size_t i = 0; i < nm; i++) {
        /* + 16: strip_copy below reads up to 16 bytes past the end. */
        if (buf_reserve(text, ROLE_LEN[m[i].role] + 3 + m[i].len + 16)) return -2;
        if (i) text->p[text->len++] = '\n';
        memcpy(text->p + text->len, ROLE_NAME[m[i].role], ROLE_LEN[m[i].role]);
        text->len += ROLE_LEN[m[i].role];
        text->p[text->len++] = ':';
        text->p[text->len++] = ' ';
        const char *s = arena->p + m[i].off;
        char *o = text->p + text->len;
        lower_copy(o, s, m[i].len);
        if (!ru->trusted && ru->check_error && m[i].role == R_ASSISTANT
            && error_candidate(o, m[i].len))
            return 0;
        text->len += m[i].len;
    }
    if (pii) {
        /* For the scrubber: the record in the chat form (an OpenAI line with its labels),
         * its lengths before the scrub (as Python validates them). */
        buf_t *o = &st->scrub;
        if (buf_put(o, "{\"messages\":[", 13)) return -2;
        for (size_t i = 0; i < nm; i++) {
            if (i && buf_put(o, ",", 1)) return -2;
            if (buf_put(o, "{\"role\":\"", 9) || buf_put(o, ROLE_NAME[m[i].role], ROLE_LEN[m[i].role])
                || buf_put(o, "\",\"content\":", 12)
                || put_json_string(o, arena->p + m[i].off, m[i].len) || buf_put(o, "}", 1))
                return -2;
        }
        if (buf_put(o, "],\"category\":", 13)
            || (cat ? put_json_string(o, arena->p + cat->off, cat->len)
                    : buf_put(o, cat_json, cat_json_n))
            || buf_put(o, ",\"source\":", 10)
            || (src ? put_json_string(o, arena->p + src->off, src->len)
                    : buf_put(o, src_json, src_json_n))
            || buf_put(o, "}\n", 2) || buf_u32(&st->scrub_in, (uint32_t)in_chars)
            || buf_u32(&st->scrub_out, (uint32_t)out_chars))
            return -2;
        return 2;
    }
    /* Exact key: xxh3-128 of the text without whitespace. */
    buf_t *bare = &st->stripped;
    bare->len = 0;
    if (buf_reserve(bare, text->len + 64)) return -2;
    bare->len = strip_copy(bare->p, text->p, text->len);
    XXH128_canonical_t key;
    XXH128_canonicalFromHash(&key, XXH3_128bits(bare->p, bare->len));

    char idbuf[25];
    const char *rid;
    size_t rid_n;
    if (ru->trusted && r.id.seen && r.id.isstr) {
        rid = arena->p + r.id.off;
        rid_n = r.id.len;
    } else {
        idbuf[0] = 'r';
        for (int k = 0; k < 12; k++) {
            idbuf[1 + 2 * k] = HEX[key.digest[k] >> 4];
            idbuf[2 + 2 * k] = HEX[key.digest[k] & 15];
        }
        rid = idbuf;
        rid_n = 25;
    }
    XXH64_canonical_t order;
    XXH64_canonicalFromHash(&order, XXH3_64bits_withSeed(rid, rid_n, ru->seed));

    /* The output line, as orjson.dumps({"id", "messages", "category", "source"}) + "\n". */
    buf_t *out = &st->lines;
    size_t line_start = out->len;
    if (buf_put(out, "{\"id\":", 6) || put_json_string(out, rid, rid_n)
        || buf_put(out, ",\"messages\":[", 13))
        return -2;
    for (size_t i = 0; i < nm; i++) {
        if (i && buf_put(out, ",", 1)) return -2;
        if (buf_put(out, "{\"role\":\"", 9) || buf_put(out, ROLE_NAME[m[i].role], ROLE_LEN[m[i].role])
            || buf_put(out, "\",\"content\":", 12)
            || put_json_string(out, arena->p + m[i].off, m[i].len) || buf_put(out, "}", 1))
            return -2;
    }
    if (buf_put(out, "],\"category\":", 13)) return -2;
    if (cat ? put_json_string(out, arena->p + cat->off, cat->len) : buf_put(out, cat_json, cat_json_n))
        return -2;
    if (buf_put(out, ",\"source\":", 10)) return -2;
    if (src ? put_json_string(out, arena->p + src->off, src->len) : buf_put(out, src_json, src_json_n))
        return -2;
    if (buf_put(out, "}\n", 2)) return -2;

    PyObject *o_id = PyUnicode_FromStringAndSize(rid, (Py_ssize_t)rid_n);
    if (!o_id) return -2;
    int bad = PyList_Append(st->ids, o_id);
    Py_DECREF(o_id);
    if (bad) return -2;
    PyObject *o_cat = cat ? PyUnicode_FromStringAndSize(arena->p + cat->off, (Py_ssize_t)cat->len)
                          : (Py_INCREF(def_cat), def_cat);
    if (!o_cat) return -2;
    bad = PyList_Append(st->cats, o_cat);
    Py_DECREF(o_cat);
    if (bad) return -2;
    PyObject *o_src = src ? PyUnicode_FromStringAndSize(arena->p + src->off, (Py_ssize_t)src->len)
                          : (Py_INCREF(def_src), def_src);
    if (!o_src) return -2;
    bad = PyList_Append(st->srcs, o_src);
    Py_DECREF(o_src);
    if (bad) return -2;

    if (buf_u32(&st->line_bytes, (uint32_t)(out->len - line_start)) || buf_put(&st->keys, key.digest, 8)
        || buf_put(&st->order, order.digest, 8) || buf_u32(&st->in_chars, (uint32_t)in_chars)
        || buf_u32(&st->out_chars, (uint32_t)out_chars))
        return -2;
    if (ru->want_sketch) {
        size_t bytes = (size_t)ru->sketch.num_perm * sizeof(uint32_t);
        if (buf_reserve(&st->sigs, bytes) || buf_reserve(&st->source, bytes)) return -2;
        if (minhash(&ru->sketch, (const unsigned char *)text->p, text->len,
                    (uint32_t *)(st->sigs.p + st->sigs.len), (uint32_t *)st->source.p))
            return -2;
        st->sigs.len += bytes;
    }
    return 1;
}

static PyObject *as_bytes(buf_t *b) {
    return PyBytes_FromStringAndSize(b->p ? b->p : "", (Py_ssize_t)b->len);
}

PyDoc_STRVAR(process_doc,
"process(block, fmt, trusted, min_in, max_in, min_out, max_out, max_turns, check_error,\n"
"        check_pii, seed, max_record, category, source, category_json, source_json,\n"
"        num_perm, salt, probes)\n"
"--\n\n"
"The lines of a JSONL block: those done here as columns, the others' indices for Python.\n"
"Returns (lines_read, fast, slow, slow_spans, scrub, scrub_spans, scrub_lines, scrub_in,\n"
"scrub_out, lines, line_bytes, exact_keys, split_order, ids,\n"
"categories, sources, input_chars, output_chars, signatures); fast/slow are uint32 line\n"
"indices (blank lines are in neither), slow_spans uint64 (start, end) byte offsets of the slow\n"
"lines; scrub*: the records done but for the PII scrub (their indices, spans, chat-form\n"
"lines with labels, lengths); integer columns native-endian uint32; signatures\n"
"(num_perm uint32 per record, as dedupe.signatures) when num_perm > 0; probes: int32\n"
"[rounds, num_perm] (dedupe.probes).");

/* Kept between calls (the GIL is held throughout): no page faults for fresh buffers. */
static state_t kept;
static int kept_in_use; /* a re-entrant call (from a finaliser, say) gets its own */

static void reset(buf_t *b) { b->len = 0; }

static PyObject *process(PyObject *self, PyObject *args) {
    Py_buffer block;
    rules_t ru;
    unsigned long long seed;
    Py_ssize_t max_record;
    PyObject *def_cat, *def_src;
    const char *cat_json, *src_json;
    Py_ssize_t cat_json_n, src_json_n;
    unsigned long long salt;
    Py_buffer probes;
    if (!PyArg_ParseTuple(args, "y*iilllllppKnUUy#y#iKy*", &block, &ru.fmt, &ru.trusted,
                          &ru.min_in, &ru.max_in, &ru.min_out, &ru.max_out, &ru.max_turns,
                          &ru.check_error, &ru.check_pii, &seed, &max_record, &def_cat, &def_src,
                          &cat_json, &cat_json_n, &src_json, &src_json_n, &ru.sketch.num_perm,
                          &salt, &probes))
        return NULL;
    ru.want_sketch = ru.sketch.num_perm > 0;
    ru.sketch.salt = (uint64_t)salt;
    ru.sketch.probes = probes.buf;
    ru.sketch.rounds = ru.want_sketch ? (int)(probes.len / 4 / ru.sketch.num_perm) : 0;
    if (ru.want_sketch) {
        const int32_t *pr = probes.buf;
        for (Py_ssize_t i = 0; i < probes.len / 4; i++)
            if (pr[i] < 0 || pr[i] >= ru.sketch.num_perm) {
                PyBuffer_Release(&block);
                PyBuffer_Release(&probes);
                PyErr_SetString(PyExc_ValueError, "probe out of range");
                return NULL;
            }
    }
    ru.seed = (uint64_t)seed;
    ru.max_record = (size_t)max_record;
    int own = !kept_in_use;
    state_t st;
    if (own) {
        st = kept;
        kept_in_use = 1;
    } else {
        memset(&st, 0, sizeof st);
    }
    buf_t *all[] = {&st.scrub_idx, &st.scrub_spans, &st.scrub, &st.scrub_in, &st.scrub_out,
                    &st.fast, &st.slow, &st.slow_spans, &st.lines, &st.line_bytes, &st.keys, &st.order,
                    &st.in_chars, &st.out_chars, &st.sigs, &st.source, &st.arena,
                    &st.joined, &st.stripped};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) reset(all[i]);
    st.ms.n = 0;
    PyObject *result = NULL;
    st.ids = PyList_New(0);
    st.cats = PyList_New(0);
    st.srcs = PyList_New(0);
    if (!st.ids || !st.cats || !st.srcs) goto done;
    const unsigned char *data = block.buf, *end = data + block.len;
    uint32_t index = 0;
    int failed = 0;
    while (data < end) {
        const unsigned char *nl = memchr(data, '\n', (size_t)(end - data));
        const unsigned char *stop = nl ? nl : end;
        size_t n = (size_t)(stop - data);
        size_t k = 0;
        while (k < n && (cls[data[k]] & C_KEYWS)) k++;
        if (k < n) { /* not blank */
            int r = one_line(&st, &ru, data, n, def_cat, def_src, cat_json, (size_t)cat_json_n,
                             src_json, (size_t)src_json_n);
            if (r < 0) {
                failed = 1;
                break;
            }
            buf_t *idx = r == 1 ? &st.fast : r == 2 ? &st.scrub_idx : &st.slow;
            if (buf_u32(idx, index)) {
                failed = 1;
                break;
            }
            if (r != 1) { /* where the line is, should Python read it */
                uint64_t span[2] = {(uint64_t)(data - (const unsigned char *)block.buf),
                                    (uint64_t)(stop - (const unsigned char *)block.buf)};
                if (buf_put(r ? &st.scrub_spans : &st.slow_spans, span, sizeof span)) {
                    failed = 1;
                    break;
                }
            }
        }
        index++;
        if (!nl) break;
        data = nl + 1;
    }
    if (failed) {
        if (!PyErr_Occurred()) PyErr_NoMemory();
        goto done;
    }
    result = Py_BuildValue("(INNNNNNNNNNNNOOONNN)", (unsigned int)index, as_bytes(&st.fast),
                           as_bytes(&st.slow), as_bytes(&st.slow_spans), as_bytes(&st.scrub_idx),
                           as_bytes(&st.scrub_spans), as_bytes(&st.scrub), as_bytes(&st.scrub_in),
                           as_bytes(&st.scrub_out), as_bytes(&st.lines), as_bytes(&st.line_bytes),
                           as_bytes(&st.keys), as_bytes(&st.order), st.ids, st.cats, st.srcs,
                           as_bytes(&st.in_chars), as_bytes(&st.out_chars), as_bytes(&st.sigs));
done:
    Py_XDECREF(st.ids);
    Py_XDECREF(st.cats);
    Py_XDECREF(st.srcs);
    st.ids = st.cats = st.srcs = NULL;
    if (own) {
        kept = st;
        kept_in_use = 0;
    } else {
        for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) free(all[i]->p);
        free(st.ms.m);
    }
    PyBuffer_Release(&block);
    PyBuffer_Release(&probes);
    return result;
}

PyDoc_STRVAR(pii_doc, "pii_candidate(text: bytes) -> bool: the PII prefilter, for tests.");

/* A prefilter applied to a bytes-like object, as a Python bool (the test hooks below). */
static PyObject *prefilter_on(PyObject *arg, int (*prefilter)(const unsigned char *, size_t)) {
    Py_buffer b;
    if (PyObject_GetBuffer(arg, &b, PyBUF_SIMPLE)) return NULL;
    int r = prefilter(b.buf, (size_t)b.len);
    PyBuffer_Release(&b);
    return PyBool_FromLong(r);
}

static PyObject *py_pii_candidate(PyObject *self, PyObject *arg) {
    return prefilter_on(arg, pii_candidate);
}

PyDoc_STRVAR(error_doc, "error_candidate(text: bytes) -> bool: the error-text prefilter "
                        "(on lowercased text), for tests.");

static int error_candidate_bytes(const unsigned char *s, size_t n) {
    return error_candidate((const char *)s, n);
}

static PyObject *py_error_candidate(PyObject *self, PyObject *arg) {
    return prefilter_on(arg, error_candidate_bytes);
}

PyDoc_STRVAR(sig_doc, "signature(text: bytes, num_perm, salt, probes) -> bytes: one MinHash "
                      "signature (num_perm uint32), for tests.");

static PyObject *py_signature(PyObject *self, PyObject *args) {
    Py_buffer t, probes;
    sketch_t k;
    unsigned long long salt;
    if (!PyArg_ParseTuple(args, "y*iKy*", &t, &k.num_perm, &salt, &probes)) return NULL;
    k.salt = (uint64_t)salt;
    k.probes = probes.buf;
    k.rounds = k.num_perm > 0 ? (int)(probes.len / 4 / k.num_perm) : 0;
    PyObject *out = NULL;
    uint32_t *src = malloc((size_t)(k.num_perm > 0 ? k.num_perm : 1) * 4);
    if (k.num_perm > 0 && src) {
        out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)k.num_perm * 4);
        if (out && minhash(&k, t.buf, (size_t)t.len, (uint32_t *)PyBytes_AS_STRING(out), src)) {
            Py_CLEAR(out);
            PyErr_NoMemory();
        }
    } else {
        PyErr_SetString(PyExc_ValueError, "num_perm must be > 0");
    }
    free(src);
    PyBuffer_Release(&t);
    PyBuffer_Release(&probes);
    return out;
}

/* ------------------------------------------------------------------ JSON arrays */

/* A strict validator for a subset of JSON on which ijson (the reference reader of JSON
 * arrays) and orjson agree value for value: strings of printable ASCII with simple escapes
 * (\u only for 0x01-0x7f), integers and plain decimals of at most 15 digits, true, false,
 * null, nesting at most 64 deep. Anything else: not sure (the caller reads with ijson). */
typedef struct {
    const unsigned char *p, *end;
} scan_t;

static void scan_ws(scan_t *c) {
    while (c->p < c->end && (*c->p == ' ' || *c->p == '\t' || *c->p == '\n' || *c->p == '\r'))
        c->p++;
}

static int scan_string(scan_t *c) {
    const unsigned char *p = c->p + 1;
    while (p < c->end) {
        while (p < c->end && (cls[*p] & C_PLAIN) && *p != 0x7f) p++;
        if (p >= c->end) return -1;
        unsigned char ch = *p;
        if (ch == '"') {
            c->p = p + 1;
            return 0;
        }
        if (ch < 0x20 || ch >= 0x7f) return -1;
        if (ch != '\\') {
            p++;
            continue;
        }
        if (p + 1 >= c->end) return -1;
        switch (p[1]) {
        case '"': case '\\': case '/': case 'b': case 'f': case 'n': case 'r': case 't':
            p += 2;
            break;
        case 'u': {
            if (p + 6 > c->end) return -1;
            int v = 0;
            for (int i = 2; i < 6; i++) {
                int h = hexval(p[i]);
                if (h < 0) return -1;
                v = v * 16 + h;
            }
            if (v == 0 || v >= 0x80) return -1;
            p += 6;
            break;
        }
        default: return -1;
        }
    }
    return -1;
}

static int scan_number(scan_t *c) {
    const unsigned char *p = c->p;
    int digits = 0;
    if (p < c->end && *p == '-') p++;
    if (p >= c->end || *p < '0' || *p > '9') return -1;
    if (*p == '0') {
        p++;
        digits++;
    } else {
        while (p < c->end && *p >= '0' && *p <= '9') p++, digits++;
    }
    if (p < c->end && *p == '.') {
        p++;
        if (p >= c->end || *p < '0' || *p > '9') return -1;
        while (p < c->end && *p >= '0' && *p <= '9') p++, digits++;
    }
    if (digits > 15) return -1;
    if (p < c->end && (*p == 'e' || *p == 'E')) return -1;
    c->p = p;
    return 0;
}

static int scan_value(scan_t *c, int depth) {
    if (c->p >= c->end || depth > 64) return -1;
    unsigned char ch = *c->p;
    if (ch == '"') return scan_string(c);
    if (ch == '{' || ch == '[') {
        unsigned char close = ch == '{' ? '}' : ']';
        c->p++;
        scan_ws(c);
        if (c->p < c->end && *c->p == close) {
            c->p++;
            return 0;
        }
        for (;;) {
            if (ch == '{') {
                if (c->p >= c->end || *c->p != '"' || scan_string(c)) return -1;
                scan_ws(c);
                if (c->p >= c->end || *c->p != ':') return -1;
                c->p++;
                scan_ws(c);
            }
            if (scan_value(c, depth + 1)) return -1;
            scan_ws(c);
            if (c->p < c->end && *c->p == ',') {
                c->p++;
                scan_ws(c);
                continue;
            }
            if (c->p < c->end && *c->p == close) {
                c->p++;
                return 0;
            }
            return -1;
        }
    }
    if (ch == '-' || (ch >= '0' && ch <= '9')) return scan_number(c);
    static const char *words[] = {"true", "false", "null"};
    for (int i = 0; i < 3; i++) {
        size_t n = strlen(words[i]);
        if ((size_t)(c->end - c->p) >= n && memcmp(c->p, words[i], n) == 0) {
            c->p += n;
            return 0;
        }
    }
    return -1;
}

PyDoc_STRVAR(array_doc,
"array_elements(data, max_element) -> bytes | None\n--\n\n"
"The (start, end) byte offsets (uint64 pairs) of the elements of a JSON array file's\n"
"content (a UTF-8 BOM, then whitespace, the array, whitespace), when all of it lies in\n"
"the subset on which ijson and orjson agree and no element is longer than max_element;\n"
"else None.");

static PyObject *py_array_elements(PyObject *self, PyObject *args) {
    Py_buffer b;
    Py_ssize_t max_element;
    if (!PyArg_ParseTuple(args, "y*n", &b, &max_element)) return NULL;
    scan_t c = {b.buf, (const unsigned char *)b.buf + b.len};
    buf_t spans = {0};
    int ok = 0, nomem = 0;
    if (c.end - c.p >= 3 && memcmp(c.p, "\xef\xbb\xbf", 3) == 0) c.p += 3;
    scan_ws(&c);
    if (c.p < c.end && *c.p == '[') {
        c.p++;
        scan_ws(&c);
        if (c.p < c.end && *c.p == ']') {
            c.p++;
            ok = 1;
        } else {
            for (;;) {
                const unsigned char *start = c.p;
                if (scan_value(&c, 1)) break;
                if (c.p - start > max_element) break;
                uint64_t span[2] = {(uint64_t)(start - (const unsigned char *)b.buf),
                                    (uint64_t)(c.p - (const unsigned char *)b.buf)};
                if (buf_put(&spans, span, sizeof span)) {
                    nomem = 1;
                    break;
                }
                scan_ws(&c);
                if (c.p < c.end && *c.p == ',') {
                    c.p++;
                    scan_ws(&c);
                    continue;
                }
                if (c.p < c.end && *c.p == ']') {
                    c.p++;
                    ok = 1;
                }
                break;
            }
        }
        scan_ws(&c);
        ok = ok && c.p == c.end;
    }
    PyBuffer_Release(&b);
    PyObject *out = NULL;
    if (nomem) PyErr_NoMemory();
    else if (ok) out = as_bytes(&spans);
    else out = Py_NewRef(Py_None);
    free(spans.p);
    return out;
}

/* dedupe.KeyIndex's table: open addressing, linear probing, home slot (key * FIB) >> shift,
 * value -1 = empty. Inserted keys are distinct and absent (the caller's contract), so the
 * map is the same as the vectorised inserts make, slot for slot or not. */
static const uint64_t FIB = 0x9E3779B97F4A7C15ull;

static int table_buffers(PyObject *tk, PyObject *tv, Py_buffer *bk, Py_buffer *bv) {
    if (PyObject_GetBuffer(tk, bk, PyBUF_WRITABLE)) return -1;
    if (PyObject_GetBuffer(tv, bv, PyBUF_WRITABLE)) {
        PyBuffer_Release(bk);
        return -1;
    }
    size_t slots = (size_t)bk->len / 8;
    if ((size_t)bv->len / 8 != slots || slots == 0 || (slots & (slots - 1))) {
        PyBuffer_Release(bk);
        PyBuffer_Release(bv);
        PyErr_SetString(PyExc_ValueError, "table: two arrays of the same power-of-two size");
        return -1;
    }
    return 0;
}

static PyObject *py_table_insert(PyObject *self, PyObject *args) {
    Py_buffer keys, values, bk, bv;
    PyObject *tk, *tv;
    int shift;
    if (!PyArg_ParseTuple(args, "y*y*OOi", &keys, &values, &tk, &tv, &shift)) return NULL;
    PyObject *result = NULL;
    if (keys.len / 8 != values.len / 8 || shift < 1 || shift > 63) {
        PyErr_SetString(PyExc_ValueError, "table_insert: bad arguments");
    } else if (table_buffers(tk, tv, &bk, &bv) == 0) {
        const uint64_t *k = keys.buf;
        const int64_t *v = values.buf;
        uint64_t *tkeys = bk.buf;
        int64_t *tvalues = bv.buf;
        size_t mask = (size_t)bk.len / 8 - 1, n = (size_t)keys.len / 8;
        int full = 0;
        for (size_t i = 0; i < n && !full; i++) {
            size_t slot = (size_t)((k[i] * FIB) >> shift) & mask, probes = 0;
            while (tvalues[slot] >= 0 && !(full = probes++ > mask)) slot = (slot + 1) & mask;
            if (full) break;
            tkeys[slot] = k[i];
            tvalues[slot] = v[i];
        }
        if (full) PyErr_SetString(PyExc_ValueError, "table_insert: the table is full");
        else result = Py_NewRef(Py_None);
        PyBuffer_Release(&bk);
        PyBuffer_Release(&bv);
    }
    PyBuffer_Release(&keys);
    PyBuffer_Release(&values);
    return result;
}

static PyObject *py_table_lookup(PyObject *self, PyObject *args) {
    Py_buffer keys, out, bk, bv;
    PyObject *tk, *tv;
    int shift;
    if (!PyArg_ParseTuple(args, "y*OOiw*", &keys, &tk, &tv, &shift, &out)) return NULL;
    PyObject *result = NULL;
    if (out.len / 8 != keys.len / 8 || shift < 1 || shift > 63) {
        PyErr_SetString(PyExc_ValueError, "table_lookup: bad arguments");
    } else if (table_buffers(tk, tv, &bk, &bv) == 0) {
        const uint64_t *k = keys.buf, *tkeys = bk.buf;
        const int64_t *tvalues = bv.buf;
        int64_t *o = out.buf;
        size_t mask = (size_t)bk.len / 8 - 1, n = (size_t)keys.len / 8;
        for (size_t i = 0; i < n; i++) {
            size_t slot = (size_t)((k[i] * FIB) >> shift) & mask;
            int64_t found = -1;
            for (size_t probes = 0; probes <= mask && tvalues[slot] >= 0; probes++) {
                if (tkeys[slot] == k[i]) {
                    found = tvalues[slot];
                    break;
                }
                slot = (slot + 1) & mask;
            }
            o[i] = found;
        }
        result = Py_NewRef(Py_None);
        PyBuffer_Release(&bk);
        PyBuffer_Release(&bv);
    }
    PyBuffer_Release(&keys);
    PyBuffer_Release(&out);
    return result;
}

PyDoc_STRVAR(simd_doc,
             "simd(force=None) -> str: which twin of the vector loops runs (\"avx512\" or "
             "\"sse2\"); force=\"sse2\" or \"avx512\" (where the CPU has it) switches, for tests.");
static PyObject *py_simd(PyObject *self, PyObject *args) {
    const char *force = NULL;
    if (!PyArg_ParseTuple(args, "|z", &force)) return NULL;
    if (force) {
        if (strcmp(force, "sse2") == 0) use_avx512 = 0;
        else if (strcmp(force, "avx512") == 0 && avx512_available()) use_avx512 = 1;
        else {
            PyErr_Format(PyExc_ValueError, "simd: %s is not available here", force);
            return NULL;
        }
    }
    return PyUnicode_FromString(use_avx512 ? "avx512" : "sse2");
}

static PyMethodDef methods[] = {
    {"simd", py_simd, METH_VARARGS, simd_doc},
    {"array_elements", py_array_elements, METH_VARARGS, array_doc},
    {"table_insert", py_table_insert, METH_VARARGS,
     "table_insert(keys, values, table_keys, table_values, shift): dedupe.KeyIndex inserts."},
    {"table_lookup", py_table_lookup, METH_VARARGS,
     "table_lookup(keys, table_keys, table_values, shift, out): dedupe.KeyIndex lookups."},
    {"signature", py_signature, METH_VARARGS, sig_doc},
    {"process", process, METH_VARARGS, process_doc},
    {"pii_candidate", py_pii_candidate, METH_O, pii_doc},
    {"error_candidate", py_error_candidate, METH_O, error_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fastpass",
                                    "ingest's per-record fast path (see chunks.py)", -1, methods};

/* The interface version: fastpass.py uses only a module that says the one it expects (a
 * stale build left in place by an editable install is not used). */
#define FASTPASS_ABI 2

PyMODINIT_FUNC PyInit__fastpass(void) {
    init_classes();
    init_error_literals();
    use_avx512 = avx512_available();
    PyObject *m = PyModule_Create(&module);
    if (m && PyModule_AddIntConstant(m, "ABI", FASTPASS_ABI)) Py_CLEAR(m);
    return m;
}
