/* upper.c — reads all of stdin, writes it upper-cased to stdout, and reports
 * "upper: N bytes" on stderr.
 * Test purpose: a real toolchain-built WASI command (libc stdio, malloc,
 * ctype) runs under the hub just like the hand-written WAT modules.
 * Build: ./build.sh [OUT]  (needs the `ziglang` Python package). */
#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>

int main(void) {
    size_t chunk = 64 * 1024;
    unsigned char *buf = malloc(chunk);
    size_t total = 0;
    size_t n;

    if (buf == NULL) {
        fputs("upper: out of memory\n", stderr);
        return 1;
    }
    while ((n = fread(buf, 1, chunk, stdin)) > 0) {
        for (size_t i = 0; i < n; i++) {
            buf[i] = (unsigned char)toupper(buf[i]);
        }
        if (fwrite(buf, 1, n, stdout) != n) {
            fputs("upper: write failed\n", stderr);
            return 1;
        }
        total += n;
    }
    if (ferror(stdin)) {
        fputs("upper: read failed\n", stderr);
        return 1;
    }
    if (fflush(stdout) != 0) {
        fputs("upper: write failed\n", stderr);
        return 1;
    }
    fprintf(stderr, "upper: %zu bytes\n", total);
    free(buf);
    return 0;
}
