/*
 * A stand-in for Debian's libb64.so.0d (libb64 1.2), the one library perf_analyzer 2.51 links that
 * pip cannot provide.  Written for this project from the library's documented interface: the same
 * five entry points, state structs of the same layout (perf_analyzer allocates them), and the same
 * output: the encoder breaks lines every 72 characters and ends with a newline; the decoder skips
 * every character outside the alphabet (newlines, padding).
 *
 * Built on demand by benchmarks/perf_analyzer.py when the system has no libb64.so.0d.
 */
#include <string.h>

typedef struct {
    int step;          /* bytes of the current 3-byte group consumed so far: 0, 1 or 2 */
    char result;       /* the 6-bit value carried into the next output character */
    int stepcount;     /* complete groups on the current output line */
} base64_encodestate;

typedef struct {
    int step;          /* characters of the current 4-character group consumed: 0..3 */
    char plainchar;    /* the partial output byte carried between calls */
} base64_decodestate;

static const char ALPHABET[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
enum { GROUPS_PER_LINE = 72 / 4 };

void base64_init_encodestate(base64_encodestate *state) {
    state->step = 0;
    state->result = 0;
    state->stepcount = 0;
}

int base64_encode_block(const char *plain, int length, char *code, base64_encodestate *state) {
    char *out = code;
    for (int i = 0; i < length; ++i) {
        unsigned char byte = (unsigned char)plain[i];
        switch (state->step) {
        case 0:
            *out++ = ALPHABET[byte >> 2];
            state->result = (char)((byte & 0x03) << 4);
            state->step = 1;
            break;
        case 1:
            *out++ = ALPHABET[(unsigned char)state->result | (byte >> 4)];
            state->result = (char)((byte & 0x0f) << 2);
            state->step = 2;
            break;
        default:
            *out++ = ALPHABET[(unsigned char)state->result | (byte >> 6)];
            *out++ = ALPHABET[byte & 0x3f];
            state->step = 0;
            if (++state->stepcount == GROUPS_PER_LINE) {
                *out++ = '\n';
                state->stepcount = 0;
            }
        }
    }
    return (int)(out - code);
}

int base64_encode_blockend(char *code, base64_encodestate *state) {
    char *out = code;
    if (state->step != 0) {
        *out++ = ALPHABET[(unsigned char)state->result];
        *out++ = '=';
        if (state->step == 1)
            *out++ = '=';
    }
    *out++ = '\n';
    return (int)(out - code);
}

static int sextet(char c) {
    const char *found = c ? strchr(ALPHABET, c) : NULL;
    return found ? (int)(found - ALPHABET) : -1;
}

void base64_init_decodestate(base64_decodestate *state) {
    state->step = 0;
    state->plainchar = 0;
}

int base64_decode_block(const char *code, const int length, char *plain, base64_decodestate *state) {
    char *out = plain;
    /* a byte left incomplete by the previous call is finished in the first output position */
    if (state->step != 0)
        *out = state->plainchar;
    for (int i = 0; i < length; ++i) {
        int value = sextet(code[i]);
        if (value < 0)
            continue;
        switch (state->step) {
        case 0:
            *out = (char)(value << 2);
            break;
        case 1:
            *out++ |= (char)(value >> 4);
            *out = (char)((value & 0x0f) << 4);
            break;
        case 2:
            *out++ |= (char)(value >> 2);
            *out = (char)((value & 0x03) << 6);
            break;
        default:
            *out++ |= (char)value;
        }
        state->step = (state->step + 1) % 4;
        if (state->step != 0)
            state->plainchar = *out;
    }
    return (int)(out - plain);
}
