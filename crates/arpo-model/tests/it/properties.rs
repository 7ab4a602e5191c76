//! Property tests: smart_resize and get_rope_index invariants.

use arpo_core::protocol::smart_resize;
use arpo_model::get_rope_index;
use proptest::prelude::*;

proptest! {
    #[test]
    fn smart_resize_gives_multiples_of_28_within_bounds_with_aspect_kept(
        h in 1u32..5000, w in 1u32..5000, min_side in 1u64..40, max_side in 40u64..200,
    ) {
        let (min_pixels, max_pixels) = (min_side * min_side * 28 * 28 / 4, max_side * max_side * 28 * 28);
        prop_assume!(f64::from(h.max(w)) / f64::from(h.min(w)) < 200.0);
        let (rh, rw) = smart_resize(h, w, 28, min_pixels, max_pixels).unwrap();
        prop_assert!(rh % 28 == 0 && rw % 28 == 0 && rh >= 28 && rw >= 28);
        let area = u64::from(rh) * u64::from(rw);
        prop_assert!(area <= max_pixels.max(28 * 28), "area {} > max {}", area, max_pixels);
        // Scaling up to reach min_pixels may only stop short by rounding (ceil keeps it above).
        if area < min_pixels {
            // only possible when the 28-px floor of a side was hit while scaling down
            prop_assert!(u64::from(h) * u64::from(w) > max_pixels);
        }
        // Each side is within one 28-px step (plus scaling) of the aspect-preserving size.
        let ratio_in = f64::from(w) / f64::from(h);
        let ratio_out = f64::from(rw) / f64::from(rh);
        let slack = 28.0 / f64::from(rh.min(rw)) + 28.0 / f64::from(h.min(w)).max(28.0);
        prop_assert!((ratio_out / ratio_in).ln().abs() <= 2.0 * slack + 1e-9,
            "aspect {} -> {}", ratio_in, ratio_out);
    }

    #[test]
    fn text_only_rope_index_is_0_to_len_on_all_axes(ids in proptest::collection::vec(0u32..1000, 1..300)) {
        let ids: Vec<u32> = ids.into_iter().filter(|&t| t != 5000).collect();
        let r = get_rope_index(&ids, 5000, &[], 2).unwrap();
        let want: Vec<i64> = (0..ids.len() as i64).collect();
        for axis in 0..3 {
            prop_assert_eq!(&r.positions[axis], &want);
        }
        prop_assert_eq!(r.delta, 0);
    }

    #[test]
    fn image_blocks_shift_following_text_by_the_larger_merged_side(
        before in 0usize..20, after in 1usize..20, gh in 1usize..8, gw in 1usize..8,
    ) {
        let n = gh * gw;
        let mut ids = vec![1u32; before];
        ids.extend(std::iter::repeat_n(9u32, n));
        ids.extend(std::iter::repeat_n(2u32, after));
        let r = get_rope_index(&ids, 9, &[[1, gh * 2, gw * 2]], 2).unwrap();
        let first_after = before + n;
        let p = (before + gh.max(gw)) as i64;
        for axis in 0..3 {
            prop_assert_eq!(r.positions[axis][first_after], p);
            prop_assert_eq!(r.positions[axis][ids.len() - 1], p + after as i64 - 1);
        }
        let max = p + after as i64 - 1;
        prop_assert_eq!(r.delta, max + 1 - ids.len() as i64);
    }
}
