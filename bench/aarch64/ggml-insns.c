/* The llama.cpp side of bench/aarch64/count-instructions: one product of a 64 x 4096
 * weight matrix with TOKENS tokens through ggml-cpu's own vec_dot for TYPE, CALLS times
 * (built against a cross-built ggml, which is not committed; see the script).
 * TOKENS 1: one vec_dot per row (decoding). TOKENS 2: the 2-row x 2-token vec_dot
 * (nrc = 2, the smmla path) where the type has one at this build's level. */
#include "ggml.h"
#include "ggml-cpu.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { ROWS = 64, COLS = 4096 };

int main(int argc, char **argv) {
    const char *name = argc > 1 ? argv[1] : "q4_0";
    int n_tok = argc > 2 ? atoi(argv[2]) : 1;
    int calls = argc > 3 ? atoi(argv[3]) : 1;
    ggml_cpu_init();
    enum ggml_type type = GGML_TYPE_COUNT;
    for (int t = 0; t < GGML_TYPE_COUNT; t++) {
        const char *tn = ggml_type_name((enum ggml_type)t);
        if (tn && strcasecmp(tn, name) == 0) type = (enum ggml_type)t;
    }
    if (type == GGML_TYPE_COUNT) { fprintf(stderr, "unknown type %s\n", name); return 1; }
    const struct ggml_type_traits_cpu *tr = ggml_get_type_traits_cpu(type);
    enum ggml_type vdt = tr->vec_dot_type;
    size_t wrow = ggml_row_size(type, COLS), arow = ggml_row_size(vdt, COLS);
    unsigned char *w = malloc(ROWS * wrow);
    for (size_t i = 0; i < ROWS * wrow; i++) w[i] = (unsigned char)(i * 7 % 64 + 0x20);
    float *x = malloc(sizeof(float) * COLS * n_tok);
    for (size_t i = 0; i < (size_t)COLS * n_tok; i++) x[i] = ((float)(i * 5 % 11) - 5.0f) * 0.1f;
    unsigned char *a = malloc(arow * n_tok);
    for (int t = 0; t < n_tok; t++)
        ggml_get_type_traits_cpu(vdt)->from_float(x + (size_t)t * COLS, a + t * arow, COLS);
    if (n_tok == 2 && tr->nrows != 2) { fprintf(stderr, "%s: no 2x2 vec_dot at this level\n", name); return 2; }
    float out[32], sum = 0;
    for (int c = 0; c < calls; c++) {
        for (int r = 0; r < ROWS; r += (n_tok == 2 ? 2 : 1)) {
            if (n_tok == 2) {
                tr->vec_dot(COLS, out, 16, w + r * wrow, wrow, a, arow, 2);
                sum += out[0] + out[1] + out[16] + out[17];
            } else {
                tr->vec_dot(COLS, out, 0, w + r * wrow, 0, a, 0, 1);
                sum += out[0];
            }
        }
    }
    printf("%s rows %d checksum %g\n", name, ROWS, sum);
    return 0;
}
