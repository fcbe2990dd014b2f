// llama.cpp's logits step by step, for the golden files of tests/logits_golden.rs.
// scripts/make-goldens compiles it against the peer build; no llama.cpp code is committed.
//
// usage: logits MODEL FA(0|1) THREADS N_PROMPT N_GEN TOPK [lse] < ids
//   ids: whitespace-separated token ids. The first N_PROMPT are the prompt, decoded in one
//   batch. Then N_GEN steps, one decode call each, as generation runs: the step's token is
//   the next given id if any are left (teacher forcing), else the argmax (greedy; stops
//   after an end-of-generation token). Each step prints one line:
//   "TOKEN id:logit id:logit ..." with the TOPK largest logits before taking TOKEN; with
//   `lse`, "TOKEN LSE id:logit ..." where LSE is log Σ exp(logit) over the whole vocabulary
//   (so the top logits give exact probabilities: p = exp(logit - LSE)).
//   HEARTH_PEER_KV_TYPE=q8_0|q4_0 stores keys and values so (llama.cpp's -ctk/-ctv; needs
//   FA 1).
#include "llama.h"
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const float *g_logits;
static int cmp_desc(const void *a, const void *b) {
    float x = g_logits[*(const int *)a], y = g_logits[*(const int *)b];
    if (x != y) return (x < y) - (x > y);
    return *(const int *)a - *(const int *)b;
}

int main(int argc, char **argv) {
    if (argc != 7 && !(argc == 8 && strcmp(argv[7], "lse") == 0)) {
        fprintf(stderr, "usage: logits MODEL FA THREADS N_PROMPT N_GEN TOPK [lse] < ids\n");
        return 2;
    }
    int with_lse = argc == 8;
    int fa = atoi(argv[2]), threads = atoi(argv[3]), n_prompt = atoi(argv[4]);
    int n_gen = atoi(argv[5]), topk = atoi(argv[6]);
    static int ids[4096];
    int n = 0;
    while (n < 4096 && scanf("%d", &ids[n]) == 1) n++;
    if (n_prompt < 1 || n_prompt > n || n_prompt + n_gen > 4096) {
        fprintf(stderr, "bad N_PROMPT/N_GEN\n");
        return 2;
    }

    llama_backend_init();
    struct llama_model_params mp = llama_model_default_params();
    struct llama_model *model = llama_model_load_from_file(argv[1], mp);
    if (!model) return 1;
    const struct llama_vocab *vocab = llama_model_get_vocab(model);
    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = 512;
    cp.n_threads = threads;
    cp.n_threads_batch = threads;
    cp.flash_attn_type = fa ? LLAMA_FLASH_ATTN_TYPE_ENABLED : LLAMA_FLASH_ATTN_TYPE_DISABLED;
    const char *kv = getenv("HEARTH_PEER_KV_TYPE");
    if (kv && *kv) {
        enum ggml_type t = strcmp(kv, "q8_0") == 0 ? GGML_TYPE_Q8_0
                         : strcmp(kv, "q4_0") == 0 ? GGML_TYPE_Q4_0
                         : GGML_TYPE_COUNT;
        if (t == GGML_TYPE_COUNT) {
            fprintf(stderr, "HEARTH_PEER_KV_TYPE: q8_0 or q4_0\n");
            return 2;
        }
        cp.type_k = t;
        cp.type_v = t;
    }
    struct llama_context *ctx = llama_init_from_model(model, cp);
    if (!ctx) return 1;
    int n_vocab = llama_vocab_n_tokens(vocab);
    int *order = malloc(sizeof(int) * n_vocab);

    struct llama_batch batch = llama_batch_init(n_prompt, 0, 1);
    for (int i = 0; i < n_prompt; i++) {
        batch.token[i] = ids[i];
        batch.pos[i] = i;
        batch.n_seq_id[i] = 1;
        batch.seq_id[i][0] = 0;
        batch.logits[i] = i == n_prompt - 1;
    }
    batch.n_tokens = n_prompt;
    for (int step = 0; step < n_gen; step++) {
        if (llama_decode(ctx, batch)) {
            fprintf(stderr, "decode failed\n");
            return 1;
        }
        g_logits = llama_get_logits_ith(ctx, -1);
        for (int i = 0; i < n_vocab; i++) order[i] = i;
        qsort(order, n_vocab, sizeof(int), cmp_desc);
        int pos = n_prompt + step;
        int token = pos < n ? ids[pos] : order[0];
        printf("%d", token);
        if (with_lse) {
            double max = g_logits[order[0]], sum = 0.0;
            for (int i = 0; i < n_vocab; i++) sum += exp((double)g_logits[i] - max);
            printf(" %.9f", max + log(sum));
        }
        for (int k = 0; k < topk; k++) printf(" %d:%.6f", order[k], g_logits[order[k]]);
        printf("\n");
        if (pos >= n && llama_vocab_is_eog(vocab, token)) break;
        batch.token[0] = token;
        batch.pos[0] = pos;
        batch.n_seq_id[0] = 1;
        batch.seq_id[0][0] = 0;
        batch.logits[0] = 1;
        batch.n_tokens = 1;
    }
    llama_free(ctx);
    llama_model_free(model);
    return 0;
}
