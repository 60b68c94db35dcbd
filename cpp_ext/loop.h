/* cpp_ext/loop.h: the types the native loop (loop.c, the algorithm) and its Python type (loop_py.c)
   share: llama.cpp's declarations it calls through, the policy struct, the loop state. */
#ifndef SAFECHAT_LOOP_H
#define SAFECHAT_LOOP_H
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _WIN32
#include <windows.h>
#else
#include <time.h>
#endif

#include "verdict.h"

/* llama.h (llama-cpp-python 0.3.36), declared here rather than included */
typedef int32_t llama_token;
typedef int32_t llama_pos;
typedef int32_t llama_seq_id;
typedef struct {
    int32_t n_tokens;
    llama_token *token;
    float *embd;
    llama_pos *pos;
    int32_t *n_seq_id;
    llama_seq_id **seq_id;
    int8_t *logits;
} llama_batch;

typedef int32_t (*decode_fn)(void *ctx, llama_batch batch);
typedef float *(*logits_fn)(void *ctx, int32_t i);
typedef bool (*seq_rm_fn)(void *mem, llama_seq_id seq, llama_pos p0, llama_pos p1);
typedef llama_token (*sample_fn)(void *smpl, void *ctx, int32_t idx);
typedef bool (*is_eog_fn)(const void *vocab, llama_token token);
typedef int32_t (*piece_fn)(const void *vocab, llama_token token, char *buf, int32_t length, int32_t lstrip,
                            bool special);

enum { WHY_EVERY, WHY_MAX_GAP, WHY_ENTROPY, WHY_MARGIN, WHY_SENTENCE, WHY_END, WHY_NONE };
enum { EV_NONE, EV_RELEASE, EV_UNSAFE, EV_DONE, EV_ERROR };
#define MAX_SIDE 16 /* tokens a check decodes after the real one: side tokens, then the [CLS] */
#define MAX_EXCLUDED 64 /* ids left out of the hesitation statistics: what the sampler never picks */

/* What the loop reads of runtime.policy.SafetyPolicy: runtime.policy.LoopSpec, field for field and in
   this order (POLICY_FIELDS; runtime/backends/native_loop.py compares the two before the first Loop). */
typedef struct {
    int enabled, every, max_gap;
    double entropy_trigger, margin_trigger; /* NaN: trigger off */
    int sentence_ends;
    double threshold;
    int patience;
} Policy;
#define POLICY_FORMAT "(piiddpdi)"

typedef struct {
    PyObject_HEAD
    decode_fn decode;
    logits_fn logits;
    seq_rm_fn seq_rm;
    sample_fn sample;
    is_eog_fn is_eog;
    piece_fn piece;
    void *ctx, *mem, *smpl, *vocab;
    llama_token side[MAX_SIDE]; /* what a check decodes; the last is the [CLS] */
    int n_side, safe_id, unsafe_id, n_vocab, n_ctx, n_prompt, n_past, row;
    Policy pol;
    long excluded[MAX_EXCLUDED];
    int n_excluded, max_tokens;
    /* state */
    int streak, last_covered, released, finished, busy;
    const char *finish;
    llama_token *gen;
    int n_gen, synced_gen;
    int *tr_covered, *tr_why, n_tr, synced_tr;
    double *tr_p;
    double seconds; /* wall time spent inside run(), GIL released */
    char error[160];
} Loop;

double loop_now(void);              /* a monotonic clock in seconds (loop.c) */
int step_until_event(Loop *L);      /* decode until there is something to hand over (loop.c) */
int read_token_ids(PyObject *obj, const char *what, long *out, int max, long n_vocab);  /* loop_py.c */

#endif
