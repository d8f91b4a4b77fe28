//! The parameter table: every weight of the model with its Hub name and
//! shape, in one place. Loading, saving, gradients (`--grad-out`), the
//! optimizer and later sharding all iterate this table; model code reaches
//! weights through typed [`ParamId`]s.

use super::config::ModelConfig;

/// A weight's canonical (Hub layout) name and its checkpoint shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
}

impl ParamSpec {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Index of a parameter in the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ParamId(pub usize);

#[derive(Debug, Clone)]
pub struct VisionBlockParams {
    pub norm1: ParamId,
    pub norm2: ParamId,
    pub qkv_w: ParamId,
    pub qkv_b: ParamId,
    pub proj_w: ParamId,
    pub proj_b: ParamId,
    pub gate_w: ParamId,
    pub gate_b: ParamId,
    pub up_w: ParamId,
    pub up_b: ParamId,
    pub down_w: ParamId,
    pub down_b: ParamId,
}

#[derive(Debug, Clone)]
pub struct MergerParams {
    pub ln_q: ParamId,
    pub fc1_w: ParamId,
    pub fc1_b: ParamId,
    pub fc2_w: ParamId,
    pub fc2_b: ParamId,
}

#[derive(Debug, Clone)]
pub struct VisionParams {
    /// Conv3d weight `[hidden, C, T, P, P]`, used as `[hidden, C*T*P*P]`.
    pub patch_embed: ParamId,
    pub blocks: Vec<VisionBlockParams>,
    pub merger: MergerParams,
}

#[derive(Debug, Clone)]
pub struct TextLayerParams {
    pub input_norm: ParamId,
    pub q_w: ParamId,
    pub q_b: ParamId,
    pub k_w: ParamId,
    pub k_b: ParamId,
    pub v_w: ParamId,
    pub v_b: ParamId,
    pub o_w: ParamId,
    pub post_norm: ParamId,
    pub gate_w: ParamId,
    pub up_w: ParamId,
    pub down_w: ParamId,
}

#[derive(Debug, Clone)]
pub struct TextParams {
    pub embed: ParamId,
    pub layers: Vec<TextLayerParams>,
    pub norm: ParamId,
    /// `None` when the head is tied to the embedding.
    pub lm_head: Option<ParamId>,
}

/// The whole table plus typed handles into it.
#[derive(Debug, Clone)]
pub struct ParamLayout {
    pub specs: Vec<ParamSpec>,
    pub vision: VisionParams,
    pub text: TextParams,
    /// The parameters of each unit ZeRO-3 gathers at once, listed once.
    units: Units,
}

#[derive(Debug, Clone)]
struct Units {
    vision: Vec<Vec<ParamId>>,
    text: Vec<Vec<ParamId>>,
    root: Vec<ParamId>,
}

impl Units {
    fn of(blocks: &[VisionBlockParams], layers: &[TextLayerParams], params: usize) -> Self {
        let vision: Vec<Vec<ParamId>> = blocks
            .iter()
            .map(|b| {
                vec![
                    b.norm1, b.norm2, b.qkv_w, b.qkv_b, b.proj_w, b.proj_b, b.gate_w, b.gate_b,
                    b.up_w, b.up_b, b.down_w, b.down_b,
                ]
            })
            .collect();
        let text: Vec<Vec<ParamId>> = layers
            .iter()
            .map(|l| {
                vec![
                    l.input_norm,
                    l.q_w,
                    l.q_b,
                    l.k_w,
                    l.k_b,
                    l.v_w,
                    l.v_b,
                    l.o_w,
                    l.post_norm,
                    l.gate_w,
                    l.up_w,
                    l.down_w,
                ]
            })
            .collect();
        let mut in_unit = vec![false; params];
        for id in vision.iter().chain(&text).flatten() {
            in_unit[id.0] = true;
        }
        let root = (0..params).filter(|&i| !in_unit[i]).map(ParamId).collect();
        Self { vision, text, root }
    }
}

struct Builder(Vec<ParamSpec>);

impl Builder {
    fn add(&mut self, name: impl Into<String>, shape: &[usize]) -> ParamId {
        self.0.push(ParamSpec {
            name: name.into(),
            shape: shape.to_vec(),
        });
        ParamId(self.0.len() - 1)
    }
}

impl ParamLayout {
    pub fn new(cfg: &ModelConfig) -> Self {
        let v = &cfg.vision;
        let t = &cfg.text;
        let mut b = Builder(Vec::new());
        let (vh, vi) = (v.hidden_size, v.intermediate_size);
        let patch_embed = b.add(
            "visual.patch_embed.proj.weight",
            &[
                vh,
                v.in_channels,
                v.temporal_patch_size,
                v.patch_size,
                v.patch_size,
            ],
        );
        let blocks: Vec<VisionBlockParams> = (0..v.depth)
            .map(|i| {
                let p = format!("visual.blocks.{i}");
                VisionBlockParams {
                    norm1: b.add(format!("{p}.norm1.weight"), &[vh]),
                    norm2: b.add(format!("{p}.norm2.weight"), &[vh]),
                    qkv_w: b.add(format!("{p}.attn.qkv.weight"), &[3 * vh, vh]),
                    qkv_b: b.add(format!("{p}.attn.qkv.bias"), &[3 * vh]),
                    proj_w: b.add(format!("{p}.attn.proj.weight"), &[vh, vh]),
                    proj_b: b.add(format!("{p}.attn.proj.bias"), &[vh]),
                    gate_w: b.add(format!("{p}.mlp.gate_proj.weight"), &[vi, vh]),
                    gate_b: b.add(format!("{p}.mlp.gate_proj.bias"), &[vi]),
                    up_w: b.add(format!("{p}.mlp.up_proj.weight"), &[vi, vh]),
                    up_b: b.add(format!("{p}.mlp.up_proj.bias"), &[vi]),
                    down_w: b.add(format!("{p}.mlp.down_proj.weight"), &[vh, vi]),
                    down_b: b.add(format!("{p}.mlp.down_proj.bias"), &[vh]),
                }
            })
            .collect();
        let merged = vh * v.merge_unit();
        let merger = MergerParams {
            ln_q: b.add("visual.merger.ln_q.weight", &[vh]),
            fc1_w: b.add("visual.merger.mlp.0.weight", &[merged, merged]),
            fc1_b: b.add("visual.merger.mlp.0.bias", &[merged]),
            fc2_w: b.add("visual.merger.mlp.2.weight", &[v.out_hidden_size, merged]),
            fc2_b: b.add("visual.merger.mlp.2.bias", &[v.out_hidden_size]),
        };
        let (h, inter) = (t.hidden_size, t.intermediate_size);
        let (q_out, kv_out) = (t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim);
        let embed = b.add("model.embed_tokens.weight", &[t.vocab_size, h]);
        let layers: Vec<TextLayerParams> = (0..t.num_layers)
            .map(|i| {
                let p = format!("model.layers.{i}");
                TextLayerParams {
                    input_norm: b.add(format!("{p}.input_layernorm.weight"), &[h]),
                    q_w: b.add(format!("{p}.self_attn.q_proj.weight"), &[q_out, h]),
                    q_b: b.add(format!("{p}.self_attn.q_proj.bias"), &[q_out]),
                    k_w: b.add(format!("{p}.self_attn.k_proj.weight"), &[kv_out, h]),
                    k_b: b.add(format!("{p}.self_attn.k_proj.bias"), &[kv_out]),
                    v_w: b.add(format!("{p}.self_attn.v_proj.weight"), &[kv_out, h]),
                    v_b: b.add(format!("{p}.self_attn.v_proj.bias"), &[kv_out]),
                    o_w: b.add(format!("{p}.self_attn.o_proj.weight"), &[h, q_out]),
                    post_norm: b.add(format!("{p}.post_attention_layernorm.weight"), &[h]),
                    gate_w: b.add(format!("{p}.mlp.gate_proj.weight"), &[inter, h]),
                    up_w: b.add(format!("{p}.mlp.up_proj.weight"), &[inter, h]),
                    down_w: b.add(format!("{p}.mlp.down_proj.weight"), &[h, inter]),
                }
            })
            .collect();
        let norm = b.add("model.norm.weight", &[h]);
        let lm_head = (!t.tie_word_embeddings).then(|| b.add("lm_head.weight", &[t.vocab_size, h]));
        let units = Units::of(blocks.as_slice(), layers.as_slice(), b.0.len());
        Self {
            specs: b.0,
            vision: VisionParams {
                patch_embed,
                blocks,
                merger,
            },
            text: TextParams {
                embed,
                layers,
                norm,
                lm_head,
            },
            units,
        }
    }

    pub fn numel(&self) -> usize {
        self.specs.iter().map(ParamSpec::numel).sum()
    }

    /// The parameters of vision block `i` (one unit of ZeRO-3 gathering).
    pub fn vision_block_ids(&self, i: usize) -> &[ParamId] {
        &self.units.vision[i]
    }

    /// The parameters of decoder layer `i`.
    pub fn text_layer_ids(&self, i: usize) -> &[ParamId] {
        &self.units.text[i]
    }

    /// Every parameter outside the vision blocks and decoder layers.
    pub fn root_ids(&self) -> &[ParamId] {
        &self.units.root
    }
}

/// Values for every entry of a [`ParamLayout`] (weights, or gradients).
#[derive(Debug, Clone)]
pub struct Tensors(pub Vec<Vec<f32>>);

impl Tensors {
    pub fn zeros(layout: &ParamLayout) -> Self {
        Self(layout.specs.iter().map(|s| vec![0.0; s.numel()]).collect())
    }
    pub fn get(&self, id: ParamId) -> &[f32] {
        &self.0[id.0]
    }
    pub fn get_mut(&mut self, id: ParamId) -> &mut [f32] {
        &mut self.0[id.0]
    }
    /// Two different tensors mutably at once (a weight and its bias).
    pub fn pair_mut(&mut self, a: ParamId, b: ParamId) -> (&mut [f32], &mut [f32]) {
        assert_ne!(a, b, "pair_mut: the same tensor twice");
        if a.0 < b.0 {
            let (lo, hi) = self.0.split_at_mut(b.0);
            (&mut lo[a.0], &mut hi[0])
        } else {
            let (lo, hi) = self.0.split_at_mut(a.0);
            (&mut hi[0], &mut lo[b.0])
        }
    }
}
