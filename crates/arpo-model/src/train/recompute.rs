//! Gradient checkpointing (activation recomputation) for candle.
//!
//! candle keeps every intermediate tensor of the forward graph alive until the loss and its
//! gradients are dropped: a decoder layer of the 2B model holds a few hundred megabytes of them
//! per episode. [`checkpoint`] runs a block (a decoder layer, a vision block) as one custom op:
//! its forward keeps only the block's input; its backward runs the block again with tracking,
//! back-propagates the incoming gradient through that small graph, and returns the input's
//! gradient. The gradients of the block's own parameters cannot leave a candle custom op
//! through its return value, so they are parked in a per-thread store and merged into the
//! result by [`backward`], which every training path calls instead of `Tensor::backward`.
//!
//! The recomputed forward performs the same operations in the same order as the first one, so
//! the gradients equal those of the ordinary graph (up to the order of floating-point sums).

use std::cell::RefCell;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::backprop::GradStore;
use candle_core::{CustomOp1, Result, Tensor, Var};

use super::lora::LoraAdapter;
use super::ops::device_forwards;

thread_local! {
    /// Parameter gradients of the blocks recomputed by this thread's current backward pass.
    static PARKED: RefCell<Option<GradStore>> = const { RefCell::new(None) };
}

fn take_parked() -> Option<GradStore> {
    PARKED.with(|p| p.borrow_mut().take())
}

/// `loss.backward()`, plus the parameter gradients of every [`checkpoint`]ed block. Use it for
/// every loss whose graph may contain checkpointed blocks (it is exactly `Tensor::backward` for
/// graphs without them).
pub fn backward(loss: &Tensor) -> Result<GradStore> {
    // A backward that failed midway may have left gradients behind: never mix them in.
    drop(take_parked());
    let mut grads = loss.backward()?;
    if let Some(parked) = take_parked() {
        grads.extend(parked)?;
    }
    // candle's parameter gradients still reference the forward graph (a gradient like
    // `upstream * activation` records its op): kept as they are, a stored GradStore holds every
    // activation of its forward pass alive (measured: ~300 MB per sequence of the tiny model,
    // 11 GB for a 32-sequence update scored in parallel). Only the values are needed.
    let ids: Vec<candle_core::TensorId> = grads.get_ids().copied().collect();
    for id in ids {
        if let Some(g) = grads.get_id(id) {
            let g = g.detach();
            grads.insert_id(id, g);
        }
    }
    Ok(grads)
}

/// A block `x -> y` that [`checkpoint`] can recompute.
pub type Block = Arc<dyn Fn(&Tensor) -> Result<Tensor> + Send + Sync>;

/// A [`Block`] running `f`, which recomputes with the same LoRA dropout masks as its first run:
/// the dropout generator (shared by the adapters of a set) is rewound to its state before the
/// first run, and put back afterwards.
pub fn block<'a>(
    adapters: impl IntoIterator<Item = &'a LoraAdapter>,
    f: impl Fn(&Tensor) -> Result<Tensor> + Send + Sync + 'static,
) -> Block {
    let dropout = adapters
        .into_iter()
        .find_map(|a| a.dropout_state().map(|s| (a.clone(), s)));
    let runs = AtomicUsize::new(0);
    Arc::new(move |x: &Tensor| {
        let first = runs.fetch_add(1, Ordering::Relaxed) == 0;
        match (&dropout, first) {
            (Some((adapter, start)), false) => {
                let now = adapter.dropout_state();
                adapter.set_dropout_state(start.clone());
                let y = f(x);
                if let Some(now) = now {
                    adapter.set_dropout_state(now);
                }
                y
            }
            _ => f(x),
        }
    })
}

struct Recompute {
    block: Block,
    params: Vec<Tensor>,
}

impl Recompute {
    fn run(&self, [x]: [&Tensor; 1]) -> Result<Tensor> {
        // The block's graph (built when its parameters are tracked) is dropped with the result.
        Ok((self.block)(x)?.detach())
    }
}

impl CustomOp1 for Recompute {
    fn name(&self) -> &'static str {
        "arpo-recompute"
    }

    device_forwards!(1);

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let input = Var::from_tensor(&x.detach())?;
        let y = (self.block)(input.as_tensor())?;
        // d/dy sum(y * g) = g exactly: back-propagates the incoming gradient unchanged.
        let mut grads = (y * grad.detach())?.sum_all()?.backward()?;
        let dx = match grads.remove(input.as_tensor()) {
            Some(dx) => dx,
            None => x.zeros_like()?,
        };
        // Park the parameters' gradients only: the store also holds gradients of constants the
        // block broadcast (masks, rotary tables), and a gradient may be a view keeping a larger
        // buffer alive; a compact copy of each keeps exactly what is needed.
        let mut own = GradStore::default();
        for p in &self.params {
            if let Some(g) = grads.remove(p) {
                own.insert(p, g.copy()?);
            }
        }
        drop(grads);
        PARKED.with(|p| -> Result<()> {
            let mut p = p.borrow_mut();
            match p.as_mut() {
                Some(store) => store.extend(own),
                None => {
                    *p = Some(own);
                    Ok(())
                }
            }
        })?;
        Ok(Some(dx))
    }
}

/// `block(x)`, keeping only `x` for the backward pass (the block is run again there).
///
/// `params` are the block's trainable tensors (`Var`s): their gradients are what the backward
/// pass collects, and they are needed even when `x` itself is not tracked (the first decoder
/// layer under LoRA). A block with no trainable parameters and an untracked input simply runs
/// (nothing to differentiate).
/// The same on every device (the forward runs on the input's device).
pub fn checkpoint(x: &Tensor, params: Vec<Tensor>, block: Block) -> Result<Tensor> {
    if params.is_empty() && !x.track_op() {
        return block(x);
    }
    let x = if x.track_op() {
        x.contiguous()?
    } else {
        // A tracked leaf, so that the backward pass reaches this op.
        Var::from_tensor(x)?.into_inner()
    };
    x.apply_op1(Recompute { block, params })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{D, Device};

    fn block_of(w: &Var) -> Block {
        let w = w.as_tensor().clone();
        Arc::new(move |x: &Tensor| {
            let h = x.matmul(&w)?.tanh()?;
            candle_nn::ops::softmax(&(h * 2.0)?, D::Minus1)
        })
    }

    #[test]
    fn recomputed_gradients_equal_the_ordinary_graph() -> Result<()> {
        let dev = Device::Cpu;
        let x0 = Var::new(&[[0.3f32, -1.2, 0.7], [1.5, 0.1, -0.4]], &dev)?;
        let w1 = Var::new(
            &[[0.2f32, -0.5, 0.1], [0.7, 0.3, -0.2], [-0.6, 0.4, 0.9]],
            &dev,
        )?;
        let w2 = Var::new(
            &[[1.1f32, 0.0, -0.3], [0.2, -0.8, 0.5], [0.4, 0.6, 0.1]],
            &dev,
        )?;
        let target = Tensor::new(&[[0.1f32, 0.2, 0.7], [0.5, 0.25, 0.25]], &dev)?;
        let loss = |y: &Tensor| (y - &target)?.sqr()?.sum_all();

        let plain = {
            let h = block_of(&w1)(x0.as_tensor())?;
            loss(&block_of(&w2)(&h)?)?
        };
        let g_plain = plain.backward()?;
        let ckpt = {
            let h = checkpoint(x0.as_tensor(), vec![w1.as_tensor().clone()], block_of(&w1))?;
            loss(&checkpoint(
                &h,
                vec![w2.as_tensor().clone()],
                block_of(&w2),
            )?)?
        };
        let g_ckpt = backward(&ckpt)?;
        assert_eq!(plain.to_scalar::<f32>()?, ckpt.to_scalar::<f32>()?);
        for v in [&x0, &w1, &w2] {
            let a = g_plain.get(v.as_tensor()).expect("plain grad");
            let b = g_ckpt.get(v.as_tensor()).expect("checkpointed grad");
            let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
            let scale = a.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(scale > 1e-3, "the test needs non-zero gradients");
            assert!(
                diff <= 1e-6 * scale,
                "gradient differs by {diff} (scale {scale})"
            );
        }
        Ok(())
    }

    #[test]
    fn returned_gradients_do_not_hold_the_forward_graph() -> Result<()> {
        let dev = Device::Cpu;
        let w = Var::new(&[[0.2f32, -0.5], [0.7, 0.3]], &dev)?;
        let x = Tensor::new(&[[0.3f32, -1.2], [1.5, 0.1]], &dev)?;
        // d/dw sum(w^2 * x) = 2 w x: candle's sqr backward multiplies by its tracked input.
        let loss = (w.as_tensor().sqr()? * &x)?.sum_all()?;
        assert!(
            loss.backward()?
                .get(w.as_tensor())
                .expect("grad")
                .track_op(),
            "candle's own gradient records its op (else this test proves nothing)"
        );
        let g = backward(&loss)?;
        let gw = g.get(w.as_tensor()).expect("grad");
        assert!(
            !gw.track_op(),
            "the gradient still references the forward graph"
        );
        let plain = loss.backward()?;
        let diff = (gw - plain.get(w.as_tensor()).expect("grad"))?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert_eq!(diff, 0.0);
        Ok(())
    }

    #[test]
    fn parameters_behind_an_untracked_input_still_get_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::new(&[[0.3f32, -1.2, 0.7]], &dev)?;
        let w = Var::new(
            &[[0.2f32, -0.5, 0.1], [0.7, 0.3, -0.2], [-0.6, 0.4, 0.9]],
            &dev,
        )?;
        let plain = block_of(&w)(&x)?.sqr()?.sum_all()?.backward()?;
        let g = backward(
            &checkpoint(&x, vec![w.as_tensor().clone()], block_of(&w))?
                .sqr()?
                .sum_all()?,
        )?;
        let a = plain.get(w.as_tensor()).expect("plain");
        let b = g.get(w.as_tensor()).expect("checkpointed");
        assert!((a - b)?.abs()?.max_all()?.to_scalar::<f32>()? <= 1e-7);
        // Nothing is left parked for the next backward pass.
        assert!(take_parked().is_none());
        Ok(())
    }
}
