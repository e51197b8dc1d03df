// Operand preparation of the multi-tensor CUDA kernels (csrc/cuda/update.cu, backward_step.cu),
// compiled by every build so that the CPU tests run it (contract: csrc/include/pymaml/device_plan.h).
// Every copy is made and every address taken here, before the caller's first launch.
#include <ATen/OpMathType.h>
#include <pymaml/device_plan.h>

#include <algorithm>

namespace pymaml::device {

UpdatePlan plan_sgd_update(at::TensorList params, at::TensorList grads, const LrSpec& spec, double lr,
                           at::TensorList lrs, bool inplace, const FlagSpec& flag, at::Device device) {
  const size_t n = params.size();
  UpdatePlan plan;
  plan.lr_arg = spec.form == LrForm::kShared ? spec.host_value : lr;
  plan.outs.reserve(n);
  std::vector<at::Tensor> p_c(n), g_c(n), lr_c(n);
  // Per-element α is read as stored when its dtype is the parameter's, else in the opmath type.
  std::vector<std::pair<at::ScalarType, at::ScalarType>> keys(n);
  for (size_t i = 0; i < n; ++i) {
    const at::ScalarType t = params[i].scalar_type();
    at::ScalarType lt = t;
    p_c[i] = params[i].contiguous();  // params[i] itself when contiguous: updated in place
    g_c[i] = grads[i].contiguous();
    if (spec.per_element(lrs, i) && params[i].numel() > 0) {
      lt = lrs[i].scalar_type() == t ? t : at::toOpMathType(t);
      lr_c[i] = contiguous_as(lrs[i], lt);
    }
    keys[i] = {t, lt};
    plan.outs.push_back(inplace ? p_c[i] : at::empty(params[i].sizes(), params[i].options()));
  }
  for (const auto& [key, idx] : group_by(keys)) {
    UpdateGroup group{key.first, key.second, {}};
    group.entries.reserve(idx.size());
    for (size_t i : idx) {
      TensorEntry<4> e;
      e.numel = params[i].numel();
      if (e.numel == 0) continue;
      e.flag = flag.at(i);
      e.addr = {address(p_c[i], device), address(g_c[i], device), nullptr, address(plan.outs[i], device)};
      const at::Tensor* scalar = nullptr;  // a one-element α read on the device
      if (spec.shared_on_device()) {
        scalar = &lrs[0];
      } else if (spec.form == LrForm::kPerParam && !spec.per_element(lrs, i)) {
        scalar = &lrs[i];
      }
      if (scalar != nullptr) {
        e.mode[0] = kDevice;
        e.scalar[0] = scalar->const_data_ptr();
        e.scalar_dtype[0] = static_cast<uint8_t>(scalar->scalar_type());
      } else if (spec.per_element(lrs, i)) {
        e.mode[0] = kElement;
        e.addr[2] = address(lr_c[i], device);
      } else {
        e.mode[0] = kArg;  // the float lr, or a shared α read on the host
      }
      group.entries.push_back(e);
    }
    plan.groups.push_back(std::move(group));
  }
  for (size_t i = 0; i < n; ++i) {
    if (!p_c[i].is_same(params[i]) && !inplace) plan.keep.push_back(std::move(p_c[i]));
    if (!g_c[i].is_same(grads[i])) plan.keep.push_back(std::move(g_c[i]));
    if (lr_c[i].defined()) plan.keep.push_back(std::move(lr_c[i]));
  }
  return plan;
}

StepPlan plan_backward_step(const char* op, at::TensorList v, at::TensorList hvp, at::TensorList grads,
                            const LrSpec& lr_spec, at::TensorList lrs, const LrSpec& next_spec,
                            at::TensorList next_lrs, double next_lr, bool has_next, const FlagSpec& flag,
                            at::Device device) {
  const size_t n = v.size();
  const bool want_lr_grad = lr_spec.form != LrForm::kNone;
  StepPlan plan;
  plan.next_arg = next_spec.form == LrForm::kShared ? next_spec.host_value : next_lr;
  plan.v_out.resize(n);
  plan.lg_buf.resize(n);
  if (has_next) plan.u_next.resize(n);
  plan.partial_base.assign(n, 0);
  std::vector<at::Tensor> v_c(n), h_c(n), g_c(n), na_c(n);
  // Per-element α_next / lr_grad are handled in the parameter's dtype when theirs matches, else in
  // its opmath type (the reference converts α to opmath and lr_grad from opmath).
  std::vector<std::pair<at::ScalarType, at::ScalarType>> keys(n);
  bool any_reduce = false;
  for (size_t i = 0; i < n; ++i) {
    const at::ScalarType t = v[i].scalar_type();
    const bool lg_elem = lr_spec.per_element(lrs, i);
    const bool na_elem = next_spec.per_element(next_lrs, i);
    at::ScalarType lt = t;
    if ((lg_elem && lrs[i].scalar_type() != t) || (na_elem && next_lrs[i].scalar_type() != t)) {
      lt = at::toOpMathType(t);
    }
    keys[i] = {t, lt};
    any_reduce = any_reduce || (want_lr_grad && !lg_elem);
    v_c[i] = v[i].contiguous();
    h_c[i] = hvp[i].contiguous();
    if (want_lr_grad) g_c[i] = grads[i].contiguous();
    if (na_elem) na_c[i] = contiguous_as(next_lrs[i], lt);
    plan.v_out[i] = at::empty(v[i].sizes(), v[i].options());
    if (lg_elem) plan.lg_buf[i] = at::empty(v[i].sizes(), v[i].options().dtype(lt));
    if (has_next) plan.u_next[i] = at::empty(v[i].sizes(), v[i].options());
    plan.partial_base[i] = plan.total_chunks;
    plan.total_chunks += num_chunks(v[i].numel());
  }
  TORCH_CHECK(plan.total_chunks <= std::numeric_limits<int32_t>::max(), op, ": too many chunks: ",
              plan.total_chunks);
  if (any_reduce) plan.partials = at::empty({plan.total_chunks}, v[0].options().dtype(at::kDouble));

  for (const auto& [key, idx] : group_by(keys)) {
    StepGroup group{key.first, key.second, {}};
    group.entries.reserve(idx.size());
    for (size_t i : idx) {
      TensorEntry<7> e;
      e.numel = v[i].numel();
      if (e.numel == 0) continue;
      e.flag = flag.at(i);
      e.addr[0] = address(v_c[i], device);
      e.addr[1] = address(h_c[i], device);
      e.addr[4] = address(plan.v_out[i], device);
      if (want_lr_grad) {
        e.addr[2] = address(g_c[i], device);
        if (lr_spec.per_element(lrs, i)) {
          e.mode[0] = kElement;
          e.addr[5] = address(plan.lg_buf[i], device);
        } else {
          e.mode[0] = kReduce;
          e.partial_base = static_cast<int32_t>(plan.partial_base[i]);
        }
      }
      if (has_next) {
        e.addr[6] = address(plan.u_next[i], device);
        if (next_spec.form == LrForm::kNone || (next_spec.form == LrForm::kShared && next_spec.on_host)) {
          e.mode[1] = kArg;
        } else if (next_spec.per_element(next_lrs, i)) {
          e.mode[1] = kElement;
          e.addr[3] = address(na_c[i], device);
        } else {
          const at::Tensor& a = next_spec.form == LrForm::kShared ? next_lrs[0] : next_lrs[i];
          e.mode[1] = kDevice;
          e.scalar[1] = a.const_data_ptr();
          e.scalar_dtype[1] = static_cast<uint8_t>(a.scalar_type());
        }
      }
      group.entries.push_back(e);
    }
    plan.groups.push_back(std::move(group));
  }
  for (auto* list : {&v_c, &h_c, &g_c, &na_c}) {
    for (auto& t : *list) {
      if (t.defined()) plan.keep.push_back(std::move(t));
    }
  }
  return plan;
}

}  // namespace pymaml::device
