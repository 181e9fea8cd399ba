// Write k, v rows (n, E) into the K and V caches (n_layer, n_slots, n_ctx, E) at
// (layer, slots[i], positions[i]). The caches are float32, or IEEE half with -DKV_F16=1
// (rounded to nearest even, as NumPy's astype(float16)).
// Work-item t = i * E + e copies one element of k and of v.
// Global: round_up(n * E, EW_LWS).
#include "common.clh"
#include "kv_store.clh"

__kernel __attribute__((reqd_work_group_size(EW_LWS, 1, 1)))
void kv_store_f32(__global KV_T* kc, int kc_off, __global KV_T* vc, int vc_off,
                  __global const float* k, int k_off, __global const float* v, int v_off,
                  __global const int* slots, __global const int* positions,   // (n,)
                  int layer, int n_slots, int n_ctx, int E, int n)
{
    const int t = get_global_id(0);
    if (t >= n * E) return;
    const int i = t / E, e = t % E;
    const size_t cell = ((size_t)layer * n_slots + slots[i]) * n_ctx + positions[i] % n_ctx;  // a ring: pos % n
    const size_t dst = cell * E + e;
    KV_STORE(k[k_off + t], dst, kc + kc_off);
    KV_STORE(v[v_off + t], dst, vc + vc_off);
}
