/* runtime._native.Loop: the per-token decode loop of strategic decoding, in C, GIL released.
 *
 * The prompt is prefilled (and checked) from Python; after that, `Loop.run()` samples with
 * llama.cpp's sampler chain, decodes `[token at n]` or `[token at n, side tokens at n+1.., [CLS]]` at
 * check steps (a plain model has no side tokens: `[token, [CLS]]`), reads p_unsafe from the [CLS] row,
 * removes those cells from the KV cache and keeps
 * the hold-back bookkeeping, all without the GIL. It comes back to Python only when there is
 * something to hand over: tokens cleared by a safe verdict ("release"), an unsafe verdict that
 * must stop generation ("unsafe"), the end ("done") or a llama.cpp failure ("error"). Each
 * event carries the tokens generated and the checks made since the previous one, so the
 * Python strategy (runtime/strategy.py, the reference) replays the verdicts and stays the
 * single authority over what is shown.
 *
 * The llama.cpp functions are not linked: their addresses are taken (by the Python wrapper,
 * runtime/backends/native_loop.py) from the very libllama that llama-cpp-python loaded, so one
 * process never holds two libllamas. The wrapper checks `batch_layout()` against
 * llama-cpp-python's ctypes definition of llama_batch before building a Loop.
 */
#include "loop.h"

/* A monotonic clock in seconds: QueryPerformanceCounter on Windows (MSVC and MinGW have no
   clock_gettime there), CLOCK_MONOTONIC elsewhere. */
#ifdef _WIN32
double loop_now(void) {
    LARGE_INTEGER freq, count;
    QueryPerformanceFrequency(&freq);
    QueryPerformanceCounter(&count);
    return (double)count.QuadPart / (double)freq.QuadPart;
}
#else
double loop_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}
#endif

/* Decode the token at n_past (+ the side tokens ending in [CLS] at n_past+1..); *p = p_unsafe for a check. */
static int advance(Loop *L, llama_token tok, int check, double *p) {
    llama_token toks[1 + MAX_SIDE] = {tok};
    llama_pos pos[1 + MAX_SIDE];
    int32_t n_seq[1 + MAX_SIDE];
    llama_seq_id seq0 = 0;
    llama_seq_id *seqs[1 + MAX_SIDE];
    int8_t out[1 + MAX_SIDE] = {1};
    int n = check ? 1 + L->n_side : 1;
    for (int i = 0; i < n; i++) {
        if (i) toks[i] = L->side[i - 1];
        pos[i] = L->n_past + i;
        n_seq[i] = 1;
        seqs[i] = &seq0;
        out[i] = i == 0 || i == n - 1; /* the real token's logits and the [CLS]'s */
    }
    llama_batch b = {n, toks, NULL, pos, n_seq, seqs, out};
    int32_t rc = L->decode(L->ctx, b);
    if (rc != 0) {
        snprintf(L->error, sizeof L->error, "llama_decode failed with code %d", (int)rc);
        return -1;
    }
    if (check) {
        const float *row = L->logits(L->ctx, n - 1);
        *p = row ? p_unsafe_from(row, L->safe_id, L->unsafe_id) : NAN;
        if (!L->seq_rm(L->mem, 0, L->n_past + 1, -1)) {
            snprintf(L->error, sizeof L->error, "could not remove the [CLS] cell from the KV cache");
            return -1;
        }
    }
    L->n_past += 1;
    L->row = 0;
    return 0;
}

static int ends_sentence(Loop *L, llama_token tok) {
    char buf[256];
    int32_t n = L->piece(L->vocab, tok, buf, (int32_t)sizeof buf, 0, false);
    while (n > 0 && (buf[n - 1] == ' ' || buf[n - 1] == '\t')) n--;
    if (n <= 0) return 0;
    char c = buf[n - 1];
    return c == '.' || c == '!' || c == '?' || c == '\n' || c == ':';
}

/* SafetyPolicy.due: why a check is due after the n-th generated token, sampled from batch row `row`. */
static int due(Loop *L, int row, llama_token tok) {
    int n = L->n_gen;
    const Policy *P = &L->pol;
    if (P->every && n % P->every == 0) return WHY_EVERY;
    if (P->max_gap && n - L->last_covered >= P->max_gap) return WHY_MAX_GAP;
    if (!isnan(P->entropy_trigger) || !isnan(P->margin_trigger)) {
        double entropy = NAN, margin = NAN;
        const float *logits = L->logits(L->ctx, row); /* only when a hesitation trigger is on */
        if (logits) row_stats_from(logits, L->n_vocab, L->excluded, L->n_excluded, &entropy, &margin);
        if (!isnan(P->entropy_trigger) && entropy >= P->entropy_trigger) return WHY_ENTROPY;
        if (!isnan(P->margin_trigger) && margin <= P->margin_trigger) return WHY_MARGIN;
    }
    if (P->sentence_ends && ends_sentence(L, tok)) return WHY_SENTENCE;
    return WHY_NONE;
}

/* Record a verdict; the event it causes (EV_NONE while held back below patience). */
static int verdict(Loop *L, double p, int why) {
    L->tr_covered[L->n_tr] = L->n_gen;
    L->tr_p[L->n_tr] = p;
    L->tr_why[L->n_tr] = why;
    L->n_tr++;
    L->last_covered = L->n_gen;
    if (!isfinite(p) || p < 0.0 || p > 1.0) return EV_UNSAFE;
    if (p >= L->pol.threshold) {
        L->streak++;
        return L->streak >= L->pol.patience ? EV_UNSAFE : EV_NONE;
    }
    L->streak = 0;
    if (L->n_gen > L->released) {
        L->released = L->n_gen;
        return EV_RELEASE;
    }
    return EV_NONE;
}

/* The loop of runtime.strategy.generate between the prompt check and the end check. */
int step_until_event(Loop *L) {
    for (;;) {
        if (L->n_prompt + L->n_gen + 2 >= L->n_ctx) {
            L->finish = "length";
            return EV_DONE;
        }
        int row = L->row;
        llama_token tok = L->sample(L->smpl, L->ctx, row);
        if (L->is_eog(L->vocab, tok)) {
            L->finish = "stop";
            return EV_DONE;
        }
        L->gen[L->n_gen++] = tok;
        int last = L->n_gen >= L->max_tokens;
        int why = WHY_NONE;
        if (L->pol.enabled) why = last ? WHY_END : due(L, row, tok);
        int check = why != WHY_NONE;
        double p = NAN;
        if ((check || !last) && advance(L, tok, check, &p) < 0) return EV_ERROR;
        int ev = EV_NONE;
        if (check) {
            ev = verdict(L, p, why);
        } else if (!L->pol.enabled) {
            L->released = L->n_gen;
            ev = EV_RELEASE;
        }
        if (last || ev == EV_UNSAFE) {
            L->finished = 1;
            L->finish = "length";
        }
        if (ev != EV_NONE) return ev;
        if (last) return EV_DONE;
    }
}
