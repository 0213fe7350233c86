//! DeBERTa's disentangled attention over a packed batch: the content-to-content
//! scores plus a content-to-position term (c2p: each query against the key
//! projection of the relative-position embedding of its distance to each key) and
//! a position-to-content term (p2c: each key against the query projection of the
//! embedding of the same distance), all before one softmax. Distances are taken
//! inside each sequence only, so packed sequences never see each other.
//!
//! Both position terms are matmuls of a sequence's queries (keys) against the rows
//! of the projected table its distances can reach, then a gather by distance: the
//! work per sequence grows with its own length, never with the table size.

use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};

use super::cpu::{self, ScoreBlock};
use crate::error::{EngineError, Result};

/// How a query–key distance `i - j` picks a row of the relative-embedding table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelativePositions {
    /// The table has `2 * span` rows; distance `delta` reads row `delta + span`,
    /// clamped to the table.
    span: usize,
    /// DeBERTa-v2's log buckets `(position_buckets, max_relative_positions)`:
    /// distances beyond half the buckets share rows on a log scale.
    log_buckets: Option<(usize, usize)>,
}

impl RelativePositions {
    pub fn new(span: usize, log_buckets: Option<(usize, usize)>) -> Result<Self> {
        if span == 0 {
            return Err(EngineError::Config(
                "the relative-position span must be positive".into(),
            ));
        }
        if let Some((buckets, max_position)) = log_buckets {
            // transformers divides by position_buckets / 2 and by log((max - 1) / (buckets / 2)).
            if buckets < 2 || max_position == buckets / 2 + 1 {
                return Err(EngineError::Config(format!(
                    "position_buckets {buckets} with max_relative_positions {max_position} \
                     divide by zero in the log buckets"
                )));
            }
        }
        Ok(RelativePositions { span, log_buckets })
    }

    /// Rows in the relative-embedding table these positions index.
    pub fn table_rows(&self) -> usize {
        2 * self.span
    }

    /// transformers' `make_log_bucket_position`, in f32 as torch computes it.
    fn bucket(&self, delta: i64) -> i64 {
        let Some((buckets, max_position)) = self.log_buckets else {
            return delta;
        };
        let mid = (buckets / 2) as i64;
        let abs = delta.abs();
        if abs <= mid {
            return delta;
        }
        let ratio = ((max_position - 1) as f64 / mid as f64) as f32;
        let log_pos =
            ((abs as f32 / mid as f32).ln() / ratio.ln() * (mid - 1) as f32).ceil() + mid as f32;
        log_pos as i64 * delta.signum()
    }

    /// The table row for query `i` and key `j` of one sequence (`delta = i - j`).
    pub fn row(&self, delta: i64) -> usize {
        (self.bucket(delta) + self.span as i64).clamp(0, 2 * self.span as i64 - 1) as usize
    }

    /// Rows for every distance of a sequence of `len` tokens, `-(len-1)..=len-1`, as
    /// offsets from the first row reached; and that first row and the count of rows
    /// reached (rows grow with the distance, so they form one range).
    fn sequence_rows(&self, len: usize) -> (Vec<usize>, usize, usize) {
        let last = len as i64 - 1;
        let rows: Vec<usize> = (-last..=last).map(|delta| self.row(delta)).collect();
        let first = rows[0];
        let count = rows[rows.len() - 1] - first + 1;
        (rows.into_iter().map(|r| r - first).collect(), first, count)
    }
}

/// One layer's projections of the relative-position embeddings, `[2 span, heads * d]`.
pub struct PositionProjections {
    /// c2p: the key projection, read by the queries.
    key: Option<Tensor>,
    /// p2c: the query projection, read by the keys.
    query: Option<Tensor>,
    /// For the fused CUDA kernel (bf16/f16): `key` and `query` as `[heads, d, rows]`,
    /// rows padded with zeros to a multiple of 8; its GEMMs read column ranges.
    #[cfg(feature = "cuda")]
    by_head: Option<(Option<Tensor>, Option<Tensor>)>,
}

impl PositionProjections {
    pub fn new(key: Option<Tensor>, query: Option<Tensor>, heads: usize) -> Result<Self> {
        #[cfg(feature = "cuda")]
        let by_head = {
            let fused =
                |t: &Tensor| t.device().is_cuda() && matches!(t.dtype(), DType::BF16 | DType::F16);
            if key.iter().chain(query.iter()).all(fused) {
                let arrange = |t: &Tensor| -> Result<Tensor> {
                    let (rows, width) = t.dims2()?;
                    let padded = rows.next_multiple_of(8);
                    let t = if padded > rows {
                        let zeros = Tensor::zeros((padded - rows, width), t.dtype(), t.device())?;
                        Tensor::cat(&[t, &zeros], 0)?
                    } else {
                        t.clone()
                    };
                    Ok(t.reshape((padded, heads, width / heads))?
                        .permute((1, 2, 0))?
                        .contiguous()?)
                };
                let key_t = key.as_ref().map(arrange).transpose()?;
                Some((key_t, query.as_ref().map(arrange).transpose()?))
            } else {
                None
            }
        };
        #[cfg(not(feature = "cuda"))]
        let _ = heads;
        Ok(PositionProjections {
            key,
            query,
            #[cfg(feature = "cuda")]
            by_head,
        })
    }
}

/// What every layer's disentangled attention over one batch shares: each sequence's
/// distance rows and, for the padded path, the length groups' index tensors. Built
/// once per batch: an upload to the GPU waits for the work queued before it, so one
/// per layer would stall the device between layers.
pub struct DisentangledPlan {
    cu_seqlens: Vec<usize>,
    positions: RelativePositions,
    /// Each sequence's distance rows, for the CPU kernel (built on first use: the
    /// GPU never needs them, and on a large batch they cost the host milliseconds).
    seq_rows: OnceLock<Vec<(Vec<usize>, usize, usize)>>,
    groups: OnceLock<GroupedPlan>,
    #[cfg(feature = "cuda")]
    fused: OnceLock<Option<FusedPlan>>,
}

/// What the fused CUDA kernel reads: the distance rows of the batch's longest
/// sequence (they cover every shorter one), on the device.
#[cfg(feature = "cuda")]
struct FusedPlan {
    /// u32 table row (from `first`) of distance `i - j`, at `i - j + longest - 1`.
    rel: Tensor,
    longest: usize,
    /// The table rows the position terms are computed against: `count` from `first`,
    /// a multiple of 8 (the kernel's 16-byte loads) within the zero-padded table.
    first: usize,
    count: usize,
}

impl DisentangledPlan {
    pub fn new(cu_seqlens: &[usize], positions: &RelativePositions) -> Self {
        DisentangledPlan {
            cu_seqlens: cu_seqlens.to_vec(),
            positions: *positions,
            seq_rows: OnceLock::new(),
            groups: OnceLock::new(),
            #[cfg(feature = "cuda")]
            fused: OnceLock::new(),
        }
    }

    fn seq_rows(&self) -> &[(Vec<usize>, usize, usize)] {
        self.seq_rows.get_or_init(|| {
            self.cu_seqlens
                .windows(2)
                .map(|w| self.positions.sequence_rows((w[1] - w[0]).max(1)))
                .collect()
        })
    }

    /// `None` when the rows grow faster than the distance somewhere (log buckets
    /// coarser than one row per unit): the kernel's staging assumes they do not.
    #[cfg(feature = "cuda")]
    fn fused(&self, device: &Device) -> Result<Option<&FusedPlan>> {
        if let Some(plan) = self.fused.get() {
            return Ok(plan.as_ref());
        }
        let longest = self
            .cu_seqlens
            .windows(2)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or(0)
            .max(1);
        let (rows, first, count) = self.positions.sequence_rows(longest);
        let plan = if rows.windows(2).any(|w| w[1] > w[0] + 1) {
            None
        } else {
            let table_rows = self.positions.table_rows().next_multiple_of(8);
            let count8 = count.next_multiple_of(8);
            // Widen to a multiple of 8 rows, backwards when the table ends first.
            let first8 = first.min(table_rows - count8);
            let shift = (first - first8) as u32;
            let rel: Vec<u32> = rows.into_iter().map(|r| r as u32 + shift).collect();
            let rel_len = rel.len();
            Some(FusedPlan {
                rel: Tensor::from_vec(rel, rel_len, device)?,
                longest,
                first: first8,
                count: count8,
            })
        };
        Ok(self.fused.get_or_init(|| plan).as_ref())
    }

    fn grouped(&self, device: &Device) -> Result<&GroupedPlan> {
        if let Some(plan) = self.groups.get() {
            return Ok(plan);
        }
        let plan = GroupedPlan::new(&self.cu_seqlens, &self.positions, device)?;
        Ok(self.groups.get_or_init(|| plan))
    }
}

/// Disentangled attention: `q`, `k`, `v` `[T, heads, d]` packed as the plan's batch;
/// returns `[T, heads * d]`. `scale` multiplies the sum of all score terms.
pub fn disentangled_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    plan: &DisentangledPlan,
    proj: &PositionProjections,
    scale: f64,
) -> Result<Tensor> {
    if let Some(out) = cpu_f32(q, k, v, plan, proj, scale as f32)? {
        return Ok(out);
    }
    #[cfg(feature = "cuda")]
    if let Some(out) = cuda_fused(q, k, v, plan, proj, scale)? {
        return Ok(out);
    }
    let grouped = plan.grouped(q.device())?;
    let (total, heads, d) = q.dims3()?;
    if grouped.groups.is_empty() {
        return Ok(Tensor::zeros((total, heads * d), q.dtype(), q.device())?);
    }
    // Each `[T, heads * d]` with a zero row appended, which padded slots read.
    let zero_row = Tensor::zeros((1, heads * d), q.dtype(), q.device())?;
    let with_zero_row = |t: &Tensor| Tensor::cat(&[&t.reshape((total, heads * d))?, &zero_row], 0);
    let (qz, kz, vz) = (with_zero_row(q)?, with_zero_row(k)?, with_zero_row(v)?);
    let outputs = grouped
        .groups
        .iter()
        .map(|group| group.attention(&qz, &kz, &vz, heads, proj, scale))
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::cat(&outputs, 0)?.index_select(&grouped.placement, 0)?)
}

/// The GPU path for bf16/f16: both position terms as one batched matmul each against
/// the table rows the batch reaches (`[heads, T, rows]`), read by the flash kernel,
/// which adds them to each score; no padding, one attention launch.
#[cfg(feature = "cuda")]
fn cuda_fused(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    plan: &DisentangledPlan,
    proj: &PositionProjections,
    scale: f64,
) -> Result<Option<Tensor>> {
    let d = q.dim(2)?;
    if !q.device().is_cuda()
        || !matches!(q.dtype(), DType::BF16 | DType::F16)
        || !(d == 64 || d == 128)
    {
        return Ok(None);
    }
    let Some((key_t, query_t)) = &proj.by_head else {
        return Ok(None);
    };
    let Some(fused) = plan.fused(q.device())? else {
        return Ok(None);
    };
    // [heads, T, count]: each query (key) against the table rows the batch reaches.
    let term = |side: &Tensor, table: &Option<Tensor>| -> Result<Option<Tensor>> {
        table
            .as_ref()
            .map(|t| {
                let side = if side.stride()[1..] == [d, 1] {
                    side.clone()
                } else {
                    side.contiguous()?
                };
                super::cuda_ops::head_matmul(&side, &t.narrow(2, fused.first, fused.count)?)
            })
            .transpose()
    };
    let positions = super::cuda_attention::PositionTerms {
        c2p: term(q, key_t)?,
        p2c: term(k, query_t)?,
        rel: fused.rel.clone(),
        rel_mid: fused.longest - 1,
        rel_w: fused.count,
    };
    super::cuda_attention::disentangled_attention(q, k, v, &plan.cu_seqlens, positions, scale)
}

/// How much padding a group of sequences may carry: its padded tokens stay within
/// this factor of its real ones. Lower costs more launches, higher more wasted work.
const PADDING_SLACK: f64 = 1.5;
/// Most score elements (heads x sequences x longest^2) one group materialises.
const MAX_GROUP_SCORES: usize = 1 << 27;
/// Heads assumed when bounding a group's scores before the heads are known.
const GROUP_HEADS_BOUND: usize = 16;

/// Every other device and dtype (the GPU): each term as a few batched matmuls and
/// gathers over padded sequences, rather than a dozen small launches per sequence.
/// Padding every sequence to the batch's longest would cost `count x longest^2` where
/// packing costs the sum of squares, so the sequences are sorted by length and cut
/// into groups of similar length.
struct GroupedPlan {
    groups: Vec<PaddedGroup>,
    /// For each packed row, its row in the groups' concatenated output.
    placement: Tensor,
}

impl GroupedPlan {
    fn new(cu_seqlens: &[usize], positions: &RelativePositions, device: &Device) -> Result<Self> {
        let total = cu_seqlens.last().copied().unwrap_or(0);
        // (start, len), shortest first.
        let mut order: Vec<(usize, usize)> = cu_seqlens
            .windows(2)
            .map(|w| (w[0], w[1] - w[0]))
            .filter(|&(_, len)| len > 0)
            .collect();
        order.sort_by_key(|&(_, len)| len);
        let mut groups = Vec::new();
        let (mut begin, mut tokens) = (0, 0);
        for (i, &(_, len)) in order.iter().enumerate() {
            let count = i + 1 - begin;
            let padded = count * len;
            if count > 1
                && (padded as f64 > PADDING_SLACK * (tokens + len) as f64
                    || GROUP_HEADS_BOUND * padded * len > MAX_GROUP_SCORES)
            {
                groups.push(PaddedGroup::new(
                    &order[begin..i],
                    total,
                    positions,
                    device,
                )?);
                (begin, tokens) = (i, 0);
            }
            tokens += len;
        }
        if begin < order.len() {
            groups.push(PaddedGroup::new(&order[begin..], total, positions, device)?);
        }
        // The groups' rows follow `order`; each goes back to its packed position.
        let mut placement = vec![0u32; total];
        let mut at = 0;
        for &(start, len) in &order {
            for (i, slot) in placement[start..start + len].iter_mut().enumerate() {
                *slot = (at + i) as u32;
            }
            at += len;
        }
        let placement = Tensor::from_vec(placement, total, device)?;
        Ok(GroupedPlan { groups, placement })
    }
}

/// Sequences padded to the longest of them, with what their attention reads.
struct PaddedGroup {
    batch: usize,
    longest: usize,
    /// Packed row of each padded slot; padding reads row T, a zero row.
    gather: Tensor,
    /// The padded slots that hold tokens, in order.
    keep: Tensor,
    /// `[1, batch, 1, longest]`: 0 for keys, -inf for padding.
    mask: Tensor,
    /// `[1, longest, longest]`: the table row (from `first`) of distance i - j.
    index: Tensor,
    first: usize,
    count: usize,
}

impl PaddedGroup {
    fn new(
        sequences: &[(usize, usize)],
        total: usize,
        positions: &RelativePositions,
        device: &Device,
    ) -> Result<Self> {
        let batch = sequences.len();
        let longest = sequences.iter().map(|&(_, len)| len).max().unwrap_or(0);
        let mut gather = vec![total as u32; batch * longest];
        let mut keep = Vec::with_capacity(batch * longest);
        let mut mask = vec![0f32; batch * longest];
        for (b, &(start, len)) in sequences.iter().enumerate() {
            for i in 0..longest {
                if i < len {
                    gather[b * longest + i] = (start + i) as u32;
                    keep.push((b * longest + i) as u32);
                } else {
                    mask[b * longest + i] = f32::NEG_INFINITY;
                }
            }
        }
        // Distance rows for the longest sequence cover every shorter one: a row
        // depends on the distance only.
        let (rows, first, count) = positions.sequence_rows(longest);
        let index: Vec<u32> = (0..longest)
            .flat_map(|i| (0..longest).map(move |j| (i, j)))
            .map(|(i, j)| rows[longest - 1 + i - j] as u32)
            .collect();
        let kept = keep.len();
        Ok(PaddedGroup {
            batch,
            longest,
            gather: Tensor::from_vec(gather, batch * longest, device)?,
            keep: Tensor::from_vec(keep, kept, device)?,
            mask: Tensor::from_vec(mask, (1, batch, 1, longest), device)?,
            index: Tensor::from_vec(index, (1, longest, longest), device)?,
            first,
            count,
        })
    }

    /// This group's rows of the attention output, `[sum of len, heads * d]`, from
    /// `q`, `k`, `v` as `[T + 1, heads * d]` (the last row zero, read by padding).
    /// Padded query rows are computed and dropped.
    fn attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        heads: usize,
        proj: &PositionProjections,
        scale: f64,
    ) -> Result<Tensor> {
        let d = q.dim(1)? / heads;
        let (batch, longest, count) = (self.batch, self.longest, self.count);
        // [T + 1, heads * d] -> [heads, batch * longest, d]
        let pad = |t: &Tensor| -> Result<Tensor> {
            Ok(t.index_select(&self.gather, 0)?
                .reshape((batch * longest, heads, d))?
                .transpose(0, 1)?
                .contiguous()?)
        };
        let (qp, kp, vp) = (pad(q)?, pad(k)?, pad(v)?);
        let per_sequence = |t: &Tensor, cols: usize| t.reshape((heads * batch, longest, cols));
        let mut scores = per_sequence(&qp, d)?.matmul(&per_sequence(&kp, d)?.t()?)?;
        let index = self
            .index
            .broadcast_as((heads * batch, longest, longest))?
            .contiguous()?;
        // [count, heads * d] -> [heads, d, count]
        let table = |t: &Tensor| -> Result<Tensor> {
            Ok(t.narrow(0, self.first, count)?
                .reshape((count, heads, d))?
                .permute((1, 2, 0))?
                .contiguous()?)
        };
        if let Some(key) = &proj.key {
            // c2p[i][j] = q_i . posk[row(i - j)]
            let c2p = per_sequence(&qp.matmul(&table(key)?)?, count)?.gather(&index, 2)?;
            scores = (scores + c2p)?;
        }
        if let Some(query) = &proj.query {
            // p2c[i][j] = k_j . posq[row(i - j)]: gathered along the keys' rows, then transposed.
            let index_t = index.transpose(1, 2)?.contiguous()?;
            let p2c = per_sequence(&kp.matmul(&table(query)?)?, count)?
                .gather(&index_t, 2)?
                .transpose(1, 2)?;
            scores = (scores + p2c)?;
        }
        let scores = (scores.to_dtype(DType::F32)? * scale)?
            .reshape((heads, batch, longest, longest))?
            .broadcast_add(&self.mask)?
            .reshape((heads * batch, longest, longest))?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(q.dtype())?;
        Ok(probs
            .matmul(&per_sequence(&vp, d)?)?
            .reshape((heads, batch * longest, d))?
            .transpose(0, 1)?
            .reshape((batch * longest, heads * d))?
            .index_select(&self.keep, 0)?)
    }
}

/// The CPU f32 path: the packed attention kernel with the two position terms added
/// to each (sequence, head) block of scores, each from one small single-threaded
/// matmul against the table rows that sequence reaches.
fn cpu_f32(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    plan: &DisentangledPlan,
    proj: &PositionProjections,
    scale: f32,
) -> Result<Option<Tensor>> {
    let (_, heads, d) = q.dims3()?;
    /// An absent table, or a present one usable here; None when present but not CPU f32.
    fn cpu_table(t: &Option<Tensor>) -> Option<Option<&Tensor>> {
        match t {
            None => Some(None),
            Some(t) if t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous() => {
                Some(Some(t))
            }
            Some(_) => None,
        }
    }
    let (Some(pos_key), Some(pos_query)) = (cpu_table(&proj.key), cpu_table(&proj.query)) else {
        return Ok(None);
    };
    if !(q.device().is_cpu() && q.dtype() == DType::F32) {
        return Ok(None);
    }
    let stride = heads * d;
    let (cu_seqlens, seq_rows) = (&plan.cu_seqlens, plan.seq_rows());
    let (Some(q_all), Some(k_all)) = (q.contiguous().ok(), k.contiguous().ok()) else {
        return Ok(None);
    };
    let data = |t: Option<&Tensor>| t.and_then(|t| cpu::with_cpu_f32(t, |s| s.as_ptr() as usize));
    let (q_ptr, k_ptr) = match (data(Some(&q_all)), data(Some(&k_all))) {
        (Some(a), Some(b)) => (a, b),
        _ => return Ok(None),
    };
    let (pk_ptr, pq_ptr) = (data(pos_key), data(pos_query));
    // One position term: `lhs_h · table_h[first..first+count]^T` for the rows of one
    // sequence and head, scaled, then added to the scores through the distance rows;
    // `keys_side` reads the term at [j][row(i - j)] (p2c) instead of [i][row(i - j)].
    let add_term = |block: &mut ScoreBlock, lhs: usize, table: usize, keys_side: bool| {
        let (rows, first, count) = &seq_rows[block.seq];
        let len = block.len;
        // The query side needs the block's rows; the key side every key of the sequence.
        let (lhs_row0, lhs_rows) = if keys_side {
            (0, len)
        } else {
            (block.row0, block.rows)
        };
        let mut term = vec![0f32; lhs_rows * count];
        // SAFETY: lhs and table point at live contiguous f32 buffers of [T, stride] and
        // [2 span, stride] (checked above); the rows read lie inside this sequence and
        // first..first+count inside the table, and the column block h*d..(h+1)*d inside each row.
        unsafe {
            gemm::gemm(
                lhs_rows,
                *count,
                d,
                term.as_mut_ptr(),
                1,
                *count as isize,
                false,
                (lhs as *const f32).add((block.start + lhs_row0) * stride + block.head * d),
                1,
                stride as isize,
                (table as *const f32).add(first * stride + block.head * d),
                stride as isize,
                1,
                0.0,
                scale,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
        for (r, scores) in block.scores.chunks_exact_mut(len).enumerate() {
            let i = block.row0 + r;
            // Distance i - j lives at rows[len - 1 + i - j].
            let by_distance = &rows[i..i + len];
            if keys_side {
                for (j, s) in scores.iter_mut().enumerate() {
                    *s += term[j * count + by_distance[len - 1 - j]];
                }
            } else {
                let row = &term[r * count..(r + 1) * count];
                for (j, s) in scores.iter_mut().enumerate() {
                    *s += row[by_distance[len - 1 - j]];
                }
            }
        }
    };
    let bias = |mut block: ScoreBlock| {
        if let Some(pk) = pk_ptr {
            add_term(&mut block, q_ptr, pk, false);
        }
        if let Some(pq) = pq_ptr {
            add_term(&mut block, k_ptr, pq, true);
        }
    };
    cpu::attention_f32(
        &q_all,
        &k_all,
        v,
        heads,
        heads,
        d,
        cu_seqlens,
        false,
        None,
        scale,
        None,
        Some(&bias),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_without_buckets_are_clamped_distances() {
        let p = RelativePositions::new(4, None).unwrap();
        let rows: Vec<usize> = (-6..=6).map(|d| p.row(d)).collect();
        assert_eq!(rows, [0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 7, 7, 7]);
    }

    #[test]
    fn log_buckets_match_transformers() {
        // transformers' make_log_bucket_position(d, 256, 512) (deberta-v3-base), some values
        // and, for all d in 0..=2048, the sum and the index-weighted sum of the buckets.
        let p = RelativePositions::new(256, Some((256, 512))).unwrap();
        let bucket = |d: i64| p.bucket(d);
        for (d, want) in [
            (0, 0),
            (1, 1),
            (128, 128),
            (129, 129),
            (131, 131),
            (132, 131),
            (133, 132),
            (200, 169),
            (255, 192),
            (256, 192),
            (300, 207),
            (384, 229),
            (400, 233),
            (511, 255),
            (512, 256),
            (583, 268),
            (596, 270),
            (1000, 317),
        ] {
            assert_eq!(bucket(d), want, "distance {d}");
            assert_eq!(bucket(-d), -want, "distance -{d}");
        }
        let all: Vec<i64> = (0..=2048).map(bucket).collect();
        assert_eq!(all.iter().sum::<i64>(), 599_894);
        let weighted: i64 = all.iter().enumerate().map(|(i, b)| i as i64 * b).sum();
        assert_eq!(weighted, 707_134_860);
        // The fixtures' buckets (8, 32) over 0..300.
        let p = RelativePositions::new(8, Some((8, 32))).unwrap();
        let all: Vec<i64> = (0..300).map(|d| p.bucket(d)).collect();
        assert_eq!(all.iter().sum::<i64>(), 2804);
        let weighted: i64 = all.iter().enumerate().map(|(i, b)| i as i64 * b).sum();
        assert_eq!(weighted, 454_494);
        assert_eq!(p.row(299), 15);
        assert_eq!(p.row(-299), 0);
    }

    #[test]
    fn grouped_padding_matches_the_cpu_kernel() {
        // Sequences of different lengths (in three length groups, one longer than the
        // bucket span) with both position terms: the GPU's padded groups, run here in
        // f32, against the CPU kernel.
        use candle_core::Device;
        let (heads, d) = (2, 4);
        let cu_seqlens = [0usize, 5, 6, 27, 47];
        let total = cu_seqlens[4];
        let positions = RelativePositions::new(4, Some((4, 16))).unwrap();
        let rows = positions.table_rows();
        let values = |n: usize, salt: f32| -> Vec<f32> {
            (0..n)
                .map(|i| (i as f32 * 0.37 + salt).sin() * 0.8)
                .collect()
        };
        let dev = Device::Cpu;
        let tensor = |salt: f32| {
            Tensor::from_vec(values(total * heads * d, salt), (total, heads, d), &dev).unwrap()
        };
        let (q, k, v) = (tensor(0.1), tensor(1.3), tensor(2.7));
        let table =
            |salt: f32| Tensor::from_vec(values(rows * heads * d, salt), (rows, heads * d), &dev);
        let proj =
            PositionProjections::new(Some(table(3.1).unwrap()), Some(table(4.2).unwrap()), heads)
                .unwrap();
        let scale = 1.0 / (3.0 * d as f64).sqrt();
        let plan = DisentangledPlan::new(&cu_seqlens, &positions);
        let kernel = disentangled_attention(&q, &k, &v, &plan, &proj, scale).unwrap();
        let grouped = plan.grouped(&dev).unwrap();
        assert_eq!(grouped.groups.len(), 3);
        let zero_row = Tensor::zeros((1, heads * d), DType::F32, &dev).unwrap();
        let with_zero_row = |t: &Tensor| {
            Tensor::cat(&[&t.reshape((total, heads * d)).unwrap(), &zero_row], 0).unwrap()
        };
        let (qz, kz, vz) = (with_zero_row(&q), with_zero_row(&k), with_zero_row(&v));
        let padded = Tensor::cat(
            &grouped
                .groups
                .iter()
                .map(|g| g.attention(&qz, &kz, &vz, heads, &proj, scale).unwrap())
                .collect::<Vec<_>>(),
            0,
        )
        .unwrap()
        .index_select(&grouped.placement, 0)
        .unwrap();
        let gap = crate::test_util::max_abs_diff(&kernel, &padded);
        assert!(gap < 1e-5, "largest difference {gap}");
    }
}
