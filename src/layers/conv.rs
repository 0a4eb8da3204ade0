//! The model's convolution: a plain `candle_nn::Conv2d` that trains on the fast kernels, or
//! its fused inference form with a folded batch norm.

use candle_core::{DType, Module, Result, Tensor};

use super::conv_train::{add_relu, TRAIN_ALGORITHM};
pub use super::conv_train::{conv2d_train, conv2d_train_fused, TrainBias, TrainConv2d};
pub use crate::kernels::{Algorithm, FusedConv2d, Precision};

/// A plain `candle_nn::Conv2d` (used for training) or its fused inference form.
#[derive(Debug, Clone)]
pub enum Conv {
    /// Candle's convolution, differentiable.
    Plain(candle_nn::Conv2d),
    /// The fast inference path.
    Fused(FusedConv2d),
}

impl Conv {
    /// `relu?(conv(x) [+ res])`, `res` being a residual of the output's shape.
    pub fn forward_with(&self, x: &Tensor, res: Option<&Tensor>, relu: bool) -> Result<Tensor> {
        match self {
            Conv::Fused(f) => f.forward(x, res, relu),
            Conv::Plain(c) => plain_forward(c, x, res, relu),
        }
    }

    /// Replaces a plain convolution by its fused form (weights scaled per output channel by
    /// `scale` and shifted by `shift`, i.e. a folded batch norm, when given).
    pub fn fuse(
        &mut self,
        scale_shift: Option<(&Tensor, &Tensor)>,
        precision: Precision,
    ) -> Result<()> {
        self.fuse_with(scale_shift, |w, b, s, p| {
            FusedConv2d::with_options(w, b, (s, p), precision.algorithm(), precision)
        })
    }

    /// As [`Conv::fuse`] for a frozen layer of a model in training: the same algorithm as
    /// the trained layers, since Winograd's error in the frozen stages' output pushed deep
    /// float32 gradients past the torchvision parity tolerance.
    pub fn fuse_frozen(&mut self, scale_shift: Option<(&Tensor, &Tensor)>) -> Result<()> {
        self.fuse_with(scale_shift, |w, b, s, p| {
            FusedConv2d::with_algorithm(w, b, s, p, TRAIN_ALGORITHM)
        })
    }

    fn fuse_with(
        &mut self,
        scale_shift: Option<(&Tensor, &Tensor)>,
        make: impl FnOnce(&Tensor, &Tensor, usize, usize) -> Result<FusedConv2d>,
    ) -> Result<()> {
        let Conv::Plain(c) = self else {
            return Ok(());
        };
        let cfg = c.config();
        let w = c.weight();
        if cfg.dilation != 1
            || cfg.groups != 1
            || !crate::kernels::native(w.device())
            || w.dtype() != DType::F32
        {
            return Ok(());
        }
        let cout = c.weight().dim(0)?;
        let bias = match c.bias() {
            Some(b) => b.clone(),
            None => Tensor::zeros(cout, c.weight().dtype(), c.weight().device())?,
        };
        let (weight, bias) = match scale_shift {
            None => (c.weight().clone(), bias),
            Some((scale, shift)) => {
                let s = scale.flatten_all()?;
                let w = c.weight().broadcast_mul(&s.reshape((cout, 1, 1, 1))?)?;
                let b = ((bias * &s)? + shift.flatten_all()?)?;
                (w, b)
            }
        };
        *self = Conv::Fused(make(&weight, &bias, cfg.stride, cfg.padding)?);
        Ok(())
    }
}

/// A differentiable convolution with its bias, residual and ReLU fused (see [`conv2d_train_fused`]).
fn plain_forward(
    c: &candle_nn::Conv2d,
    x: &Tensor,
    residual: Option<&Tensor>,
    relu: bool,
) -> Result<Tensor> {
    let cfg = c.config();
    if cfg.dilation != 1 || cfg.groups != 1 {
        return add_relu(c.forward(x)?, residual, relu);
    }
    let bias = c.bias().map_or(TrainBias::None, TrainBias::Learned);
    conv2d_train_fused(x, c.weight(), cfg.stride, cfg.padding, bias, residual, relu)
}

/// A convolution ready to run on several inputs with the same weights (see [`Conv::prepare_with`]).
#[derive(Debug)]
pub enum PreparedConv<'a> {
    /// Runs as [`Conv::forward_with`].
    Direct(&'a Conv),
    /// A trainable CPU convolution with its kernels packed once.
    Train(std::sync::Arc<TrainConv2d>),
}

impl Conv {
    /// Prepares the kernels once for several inputs: a trainable convolution on the CPU then
    /// packs its weights once per step instead of once per feature map, its forward running
    /// `algorithm` (see [`TrainConv2d::with_algorithm`]).
    pub fn prepare_with(&self, algorithm: Algorithm) -> Result<PreparedConv<'_>> {
        let Conv::Plain(c) = self else {
            return Ok(PreparedConv::Direct(self));
        };
        let cfg = c.config();
        if cfg.dilation != 1 || cfg.groups != 1 {
            return Ok(PreparedConv::Direct(self));
        }
        let bias = c.bias().map_or(TrainBias::None, TrainBias::Learned);
        Ok(
            match TrainConv2d::with_algorithm(c.weight(), bias, cfg.stride, cfg.padding, algorithm)?
            {
                Some(t) => PreparedConv::Train(t),
                None => PreparedConv::Direct(self),
            },
        )
    }
}

impl PreparedConv<'_> {
    /// As [`Conv::forward_with`].
    pub fn forward_with(&self, x: &Tensor, res: Option<&Tensor>, relu: bool) -> Result<Tensor> {
        match self {
            PreparedConv::Direct(c) => c.forward_with(x, res, relu),
            PreparedConv::Train(t) => t.forward(x, res, relu),
        }
    }
}

impl Module for Conv {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with(x, None, false)
    }
}
